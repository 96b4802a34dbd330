"""Using a trained model, in one process without DeepSpeed: load it (:mod:`.load`), export a
checkpoint (:mod:`.export`), held-out loss and bits per byte across loop counts
(:mod:`.evaluate`, :mod:`.text_bytes`), sampling with the compressed cache (:mod:`.generate`).
The commands ``mythos eval``, ``generate`` and ``ckpt`` are :mod:`.eval_cli`, :mod:`.generate_cli`
and :mod:`.ckpt_cli`.  Nothing is imported here, so that ``mythos <command> --help`` stays fast."""
