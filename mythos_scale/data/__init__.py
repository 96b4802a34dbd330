"""Text -> tokenizer -> packed token sequences in MDS shards -> per-data-parallel-rank loaders.

Modules (imported directly; this package stays light so tokenizer worker processes start fast):

- ``documents``: finding input files (txt / jsonl / parquet, folders, globs) and reading documents
- ``tokenizer``: training a byte-level BPE offline, loading a local tokenizer, its EOS and hash
- ``prepare``:   tokenize in parallel, pack into ``seq_len + 1`` token sequences, write MDS shards
- ``manifest``:  the dataset manifest, ``DataError`` and ``check_compatible``
- ``embedded``:  the default corpus (Python standard library sources), prepared once and cached
- ``sources``:   the datasets of ``data.sources``: resolved (folder, URL, embedded) and verified
- ``order``:     the global sample stream: blending and the keyed permutation (splitmix / Feistel)
- ``loader``:    ``build_train_loader`` / ``build_val_loader`` on ``StreamingDataset``
- ``data_cli``:  ``mythos data tokenizer | prepare | embedded``

The data package never imports the model.
"""
