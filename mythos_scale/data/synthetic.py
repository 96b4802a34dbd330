"""Synthetic reasoning tasks with a known depth, as prepared dataset folders the trainer reads.

Two tasks, each item a prompt of whitespace-separated words then ``?`` and one answer word:

- ``p_hop`` (p-hop induction, Sanford et al. 2024; Saunshi et al. 2025): a random sequence over a
  small alphabet; from the last position, one hop jumps to the position just after the previous
  occurrence of the current symbol; the answer is the symbol reached after ``p`` hops.  The prompt
  states ``p`` as ``p`` hop marks ``>`` after the sequence (a count, so deeper items than trained
  use no unseen token).  The difficulty is ``p``: every item is generated so that all ``p`` hops
  exist.
- ``arith`` (variable-binding chains of modular arithmetic): ``a = 3 ; b = a + 4 ; c = b * 2 ;
  ... ? c`` with values mod 10, each step reading the previous variable; the difficulty is the
  number of steps after the first binding.  Shuffled distractor bindings of fresh variables are
  interleaved so that the chain must be followed by name, not by position.

A dataset folder is the one :mod:`.prepare` writes (manifest, tokenizer.json, train/ and val/
MDS shards) with one sample per item, padded to ``seq_len + 1`` tokens, and a second column
``loss_mask`` (uint8, 1 at the answer token) that the loader turns into ignore-index labels, so
the loss and the accuracy count the answer alone.  The train split holds difficulties
``1..max_difficulty``; the val split holds ``n_val`` items of each difficulty
``1..eval_max_difficulty`` in difficulty order (counts in ``manifest.inputs["val_difficulties"]``),
none of whose prompts appears in train.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from streaming import MDSWriter
from tokenizers import Tokenizer, models, pre_tokenizers
from tqdm import tqdm

from mythos_scale.data.manifest import MANIFEST_NAME, MASK_COLUMN, TOKENIZER_NAME, DataError, Manifest, SplitStats
from mythos_scale.data.prepare import SHARD_HASHES, check_output_folder, move_into_place, token_dtype
from mythos_scale.data.tokenizer import EOS_TOKEN, file_sha256

TASKS = ("p_hop", "arith")
PAD_TOKEN, UNK_TOKEN, QUERY, HOP_MARK = "<pad>", "<unk>", "?", ">"
MODULUS = 10
HOP_ALPHABET = [f"s{i}" for i in range(8)]
VARIABLES = list("abcdefghijklmnopqrstuvwxyz")
VOCAB = [EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, QUERY, "=", ";", "+", "*", "-",
         *map(str, range(MODULUS)), *VARIABLES, *HOP_ALPHABET, HOP_MARK]


@dataclass(frozen=True)
class Item:
    prompt: list[str]  # words before the query mark
    answer: str
    difficulty: int

    def words(self) -> list[str]:
        return [*self.prompt, QUERY, self.answer]


# --------------------------------------------------------------------------- generators


def p_hop_item(rng: random.Random, p: int, length: int = 24, alphabet: int = 4) -> Item:
    """A p-hop induction item: ``length`` symbols of the first ``alphabet`` of HOP_ALPHABET, then
    ``p`` hop marks (the answer follows ``p`` hops from the last symbol).  Resampled until every
    hop exists.  The length keeps deep hops distinct: measured over 300 items per p, the answer after p hops equals
    the one after p - 1 for 23-41% of items at p = 2..6 (chance 25%); at length 12 it was 57% by
    p = 4, so a shallower computation would solve the deep items.  Two hops fewer is still a
    shortcut: chains fall into 2-cycles, and the answer after p - 2 hops is right for 64-73% of
    items at p = 3..6 (200 held-out items each), a baseline for accuracy beyond trained depths."""
    symbols = HOP_ALPHABET[:alphabet]
    while True:
        seq = [rng.choice(symbols) for _ in range(length)]
        last_seen: dict[str, int] = {}
        previous = []  # previous[i]: the last j < i with seq[j] == seq[i], or -1
        for i, s in enumerate(seq):
            previous.append(last_seen.get(s, -1))
            last_seen[s] = i
        pos = length - 1
        for _ in range(p):
            if previous[pos] < 0:
                break
            pos = previous[pos] + 1
        else:
            return Item([*seq, *[HOP_MARK] * p], seq[pos], p)


def arith_item(rng: random.Random, steps: int, distractors: int = 2) -> Item:
    """A chain ``v0 = c ; v1 = v0 op c ; ...`` of ``steps`` operations mod MODULUS, with
    ``distractors`` unrelated bindings at random places; the query names the last variable."""
    names = rng.sample(VARIABLES, steps + 1 + distractors)
    chain, others = names[:steps + 1], names[steps + 1:]
    value = rng.randrange(MODULUS)
    statements = [[chain[0], "=", str(value)]]
    for k in range(1, steps + 1):
        op, c = rng.choice("+*-"), rng.randrange(MODULUS)
        value = {"+": value + c, "*": value * c, "-": value - c}[op] % MODULUS
        statements.append([chain[k], "=", chain[k - 1], op, str(c)])
    for name in others:
        statements.insert(rng.randrange(len(statements) + 1), [name, "=", str(rng.randrange(MODULUS))])
    prompt = [w for s in statements for w in (*s, ";")] + [chain[-1]]
    return Item(prompt, str(value), steps)


GENERATORS: dict[str, Callable[[random.Random, int], Item]] = {"p_hop": p_hop_item, "arith": arith_item}


# --------------------------------------------------------------------------- solvers (independent: read the words)


def solve_p_hop(prompt: list[str], p: int | None = None) -> str:
    """Follow ``p`` hops (default: as many as the prompt's hop marks) by searching backwards from
    each position, as the task is defined."""
    seq = [w for w in prompt if w != HOP_MARK]
    pos = len(seq) - 1
    for _ in range(len(prompt) - len(seq) if p is None else p):
        pos = next(j for j in range(pos - 1, -1, -1) if seq[j] == seq[pos]) + 1
    return seq[pos]


def solve_arith(prompt: list[str]) -> str:
    """Evaluate the statements in order (any variable may be read) and return the queried one."""
    env: dict[str, int] = {}
    for statement in " ".join(prompt[:-1]).split(";"):
        words = statement.split()
        if not words:
            continue
        name, _, *expr = words
        value = env[expr[0]] if expr[0] in env else int(expr[0])
        if len(expr) == 3:
            value = eval(f"{value} {expr[1]} {int(expr[2])}") % MODULUS  # noqa: S307 (digits and one operator)
        env[name] = value
    return str(env[prompt[-1]])


def solve(task: str, item: Item) -> str:
    return solve_p_hop(item.prompt) if task == "p_hop" else solve_arith(item.prompt)


# --------------------------------------------------------------------------- tokenizer and dataset


def build_tokenizer() -> Tokenizer:
    """A word-level tokenizer of VOCAB (ids in VOCAB order), saved beside the shards."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def generate_splits(task: str, n_train: int, n_val: int, max_difficulty: int, eval_max_difficulty: int,
                    seed: int) -> tuple[list[Item], list[Item]]:
    """Train items (difficulties 1..max_difficulty, in equal shares, shuffled) and ``n_val`` val
    items of each difficulty 1..eval_max_difficulty (in that order).  Prompts are unique within
    each split and no train prompt is a val prompt."""
    if task not in GENERATORS:
        raise DataError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    if not 1 <= max_difficulty <= eval_max_difficulty:
        raise DataError(f"need 1 <= --max-difficulty ({max_difficulty}) <= --eval-max-difficulty "
                        f"({eval_max_difficulty})")
    if n_train < max_difficulty or n_val < 1:
        raise DataError(f"--n-train ({n_train}) must be >= --max-difficulty and --n-val ({n_val}) >= 1")
    if task == "arith" and eval_max_difficulty + 3 > len(VARIABLES):
        raise DataError(f"--eval-max-difficulty {eval_max_difficulty}: arith chains have at most "
                        f"{len(VARIABLES) - 3} steps (one variable per step)")
    make, rng = GENERATORS[task], random.Random(seed)

    def unique(difficulty: int, count: int, taken: set[tuple[str, ...]]) -> list[Item]:
        items, tries = [], 0
        while len(items) < count:
            item = make(rng, difficulty)
            key = tuple(item.prompt)
            tries += 1
            if key not in taken:
                taken.add(key)
                items.append(item)
            elif tries > 20 * count + 1000:
                raise DataError(f"{task} difficulty {difficulty}: fewer than {count} distinct items "
                                f"found; ask for fewer")
        return items

    taken: set[tuple[str, ...]] = set()
    val = [item for d in range(1, eval_max_difficulty + 1) for item in unique(d, n_val, taken)]
    train = [item for d in range(1, max_difficulty + 1)
             for item in unique(d, n_train // max_difficulty + (d <= n_train % max_difficulty), taken)]
    rng.shuffle(train)
    return train, val


def encode_item(tokenizer: Tokenizer, item: Item, seq_len: int, eos_id: int, pad_id: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """``seq_len + 1`` token ids (the item, EOS, then padding) and the loss mask (1 at the answer)."""
    ids = tokenizer.encode(item.words(), is_pretokenized=True, add_special_tokens=False).ids + [eos_id]
    if len(ids) > seq_len + 1:
        raise DataError(f"an item of {len(ids)} tokens does not fit --seq-len {seq_len} + 1")
    tokens = np.full(seq_len + 1, pad_id, dtype=np.int64)
    tokens[:len(ids)] = ids
    mask = np.zeros(seq_len + 1, dtype=np.uint8)
    mask[len(ids) - 2] = 1  # the answer: the last word before EOS
    return tokens, mask


def write_synthetic_dataset(task: str, out: str | Path, *, n_train: int = 20000, n_val: int = 200,
                            max_difficulty: int = 3, eval_max_difficulty: int | None = None,
                            seq_len: int | None = None, seed: int = 0, overwrite: bool = False,
                            progress: bool = True) -> Manifest:
    """Generate the task and write it as a dataset folder at ``out`` (see the module docstring).
    ``seq_len`` defaults to the longest item (with its EOS) rounded up to a multiple of 8."""
    eval_max = eval_max_difficulty or 2 * max_difficulty
    train, val = generate_splits(task, n_train, n_val, max_difficulty, eval_max, seed)
    longest = max(len(i.words()) + 1 for i in train + val)
    seq_len = seq_len or -(-longest // 8) * 8
    if longest > seq_len + 1:
        raise DataError(f"--seq-len {seq_len}: the longest {task} item has {longest} tokens; "
                        f"give at least {longest - 1}")
    final = Path(out).expanduser()
    check_output_folder(final, [], overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = build_tokenizer()
    eos_id, pad_id = tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(PAD_TOKEN)
    dtype = token_dtype(len(VOCAB))
    try:
        staging.mkdir(parents=True)
        tokenizer.save(str(staging / TOKENIZER_NAME))
        stats = {}
        for split, items in (("train", train), ("val", val)):
            columns = {"tokens": f"ndarray:{dtype}:{seq_len + 1}", MASK_COLUMN: f"ndarray:uint8:{seq_len + 1}"}
            with MDSWriter(out=str(staging / split), columns=columns, hashes=SHARD_HASHES, exist_ok=False) as writer:
                n_tokens = 0
                for item in tqdm(items, desc=f"{task} {split}", unit="item", disable=not progress):
                    tokens, mask = encode_item(tokenizer, item, seq_len, eos_id, pad_id)
                    writer.write({"tokens": tokens.astype(dtype), MASK_COLUMN: mask})
                    n_tokens += len(item.words()) + 1
            stats[split] = SplitStats(sequences=len(items), documents=len(items), tokens=n_tokens)
        counts = {str(d): sum(i.difficulty == d for i in val) for d in range(1, eval_max + 1)}
        manifest = Manifest(
            seq_len=seq_len, vocab_size=len(VOCAB), eos_id=eos_id, dtype=dtype,
            tokenizer_sha256=file_sha256(staging / TOKENIZER_NAME), hashes=SHARD_HASHES, splits=stats,
            inputs={"synthetic": task, "seed": seed, "max_difficulty": max_difficulty,
                    "eval_max_difficulty": eval_max, "val_difficulties": counts},
            extra_columns={MASK_COLUMN: f"ndarray:uint8:{seq_len + 1}"})
        (staging / MANIFEST_NAME).write_text(manifest.to_json())
        move_into_place(staging, final)
        return manifest
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_items(root: str | Path, split: str) -> list[Item]:
    """The items of a split decoded from its shards (val items carry their difficulty, train
    items difficulty 0): for tests and inspection."""
    from mythos_scale.data.loader import streaming_dataset
    from mythos_scale.data.manifest import read_manifest

    root = Path(root)
    reader = streaming_dataset([(None, str(root / split))])
    counts = read_manifest(root).inputs["val_difficulties"]
    difficulties = [int(d) for d, n in counts.items() for _ in range(n)] if split == "val" else None
    items = []
    for i in range(reader.num_samples):
        sample = reader.get_item(i)
        tokens, mask = sample["tokens"].astype(np.int64), sample[MASK_COLUMN]
        answer_at = int(np.flatnonzero(mask)[0])
        items.append(Item([VOCAB[t] for t in tokens[:answer_at - 1]], VOCAB[tokens[answer_at]],
                          difficulties[i] if difficulties else 0))
    return items
