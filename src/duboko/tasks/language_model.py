"""The language-model task: next-token prediction on a text corpus, for RNNs and GPTs alike.

A model only has to follow the language-model protocol (see `duboko.nn.sampling`):
    forward(idx (B, T), state=None) -> (logits (B, T, vocab), new_state)

Data: the corpus (data.path, default the bundled Shakespeare) is cut into `split_blocks`
contiguous blocks of text and some are held out for validation (`duboko.data.text.block_split`),
then tokenized with a `char`, `word` or `bpe` tokenizer trained here and saved as tokenizer.json in
the run folder. `setup(run_dir)` on an existing run loads that file instead of training a new one,
and sets the derived model field `vocab_size` from it before the engine builds the model.

Token folders (`data.data_dir`, what `duboko train ... --data-dir` sets): a folder written by
`duboko prepare-text` (`duboko.data.tokens`) is memory-mapped instead: the same block split, made
once when the folder was written, and the folder's tokenizer (saved into the run folder as
above; data.tokenizer/vocab_size/val_fraction/split_* are then the folder's). Batches gather
their windows from the mapped arrays, and the per-epoch draws that would grow with the corpus
(the window order, the row resets) are made per batch, so start-up time and memory do not
depend on the corpus size. A data.data_dir that is not a token folder is read as text, like
data.path.

Two ways to cut the token stream into batches (`data.stateful`):
- stateful (truncated back-propagation through time): the stream is laid out as B parallel
  contiguous streams (Zaremba et al. 2014); batch i is columns [i·T, (i+1)·T) of them, and each
  batch starts from the previous batch's hidden state, detached. The state is reset at each epoch
  start. Recurrent models see context far longer than T at no extra cost.
- reset: non-overlapping windows of T tokens in a shuffled order, each from a fresh state (what
  a GPT trains on; its state/cache is ignored in training).
Validation uses the same mode, so the two are comparable to how each model is trained.

Metrics: loss in nats per token; `bpc` = loss / ln 2 for the char tokenizer, `perplexity` =
exp(loss) for word/bpe; next-token `accuracy` too.

Distribution: the global batch is the same for any world size; rank r of W trains rows r, r + W,
... of it (`duboko.data.batching.rank_slice`), so in stateful mode each rank carries the state of
its own B / W streams.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from duboko.data.batching import rank_slice
from duboko.data.tokens import feistel_permutation, gather, is_token_folder, open_token_folder
from duboko.data.text import (
    TOKENIZER_FILE,
    TOKENIZER_KINDS,
    Tokenizer,
    block_split,
    load_tokenizer,
    read_corpus,
    train_tokenizer,
)
from duboko.config import require_at_least
from duboko.errors import DubokoError, unknown_name
from duboko.io import atomic_write_text
from duboko.seeding import generator
from duboko.tasks import Evaluation, StepOutput, Task, register_task


@dataclass
class LMDataConfig:
    path: str = ""  # text file(s) or folder(s), comma-separated ("" = bundled Shakespeare)
    # A token folder from `duboko prepare-text` (memory-mapped; its tokenizer and split are used,
    # and tokenizer/vocab_size/min_freq/val_fraction/split_* here are ignored), or else text like data.path.
    data_dir: str = ""
    tokenizer: str = "char"  # char | word | bpe
    vocab_size: int = 0  # word/bpe vocabulary size to learn (0: 10000 word, 2000 bpe); char: all chars
    min_freq: int = 1  # word tokenizer: rarer words become <unk>
    seq_len: int = 128  # tokens per training sequence (BPTT length; a GPT's block size)
    stateful: bool = True  # carry hidden state across consecutive batches (False: reset per sequence)
    # Stateful only: each row's carried state is zeroed with this probability per batch, so the
    # model also learns to start from the zero state that generation starts from (measured: with
    # the state never reset, a trained LSTM's first ~10 predictions from zero state are noise and
    # sampled text never recovers).
    state_reset_prob: float = 0.02
    val_fraction: float = 0.1  # share of the contiguous blocks held out for validation
    split_blocks: int = 10  # contiguous blocks the corpus is cut into for the split
    split_seed: int = 0  # which blocks go to validation
    max_train_tokens: int = 0  # use only the first N training tokens (0: all); for quick runs
    max_eval_tokens: int = 0  # evaluate on the first N validation tokens (0: all)
    eval_batch_size: int = 0  # sequences per validation batch (0: train.batch_size)
    sample_tokens: int = 300  # tokens generated into samples/epoch_N.txt after each epoch (0: none)
    sample_prompt: str = ""  # prompt for those samples ("": the corpus' first line)
    sample_temperature: float = 0.8  # sampling temperature for those samples


@register_task
class LanguageModelTask(Task):
    name = "language-model"
    data_config = LMDataConfig
    shown_metric = "accuracy"
    losses = ("cross_entropy",)
    # The model's vocab_size is the tokenizer's: `--set vocab_size=N` means data.vocab_size (the
    # tokenizer's target size), never the model field.
    derived_model_fields = {"vocab_size": "data.vocab_size (the tokenizer's size: data.tokenizer, data.path)"}
    # A run started from another (train.init_from) keeps that run's tokenizer, the one its
    # embeddings index: `setup(source)` loads it, and resolve takes these fields from its config.
    init_from_data_fields = ("tokenizer", "vocab_size")

    def __init__(self, config: Any, device: torch.device, rank: int = 0, world_size: int = 1):
        super().__init__(config, device, rank, world_size)
        self.tokenizer: Tokenizer | None = None
        # (N_train,) int64 on the CPU, or a read-only np.memmap (uint16/uint32) of a token folder.
        self.train_ids: Any = None
        self.val_ids: Any = None  # (N_val,)
        self.token_folder: Path | None = None
        self.prompt_text = ""
        self._state: Any = None  # the carried hidden state in stateful training

    # -- config --------------------------------------------------------------------------------
    @classmethod
    def check(cls, config: Any) -> None:
        super().check(config)
        d = config.data
        if d.tokenizer not in TOKENIZER_KINDS:
            raise unknown_name("data.tokenizer", d.tokenizer, TOKENIZER_KINDS)
        if d.seq_len < 1:
            raise DubokoError(f"data.seq_len must be >= 1, got {d.seq_len}")
        if not 0.0 <= d.state_reset_prob <= 1.0:
            raise DubokoError(f"data.state_reset_prob must be in [0, 1], got {d.state_reset_prob}")
        if not 0.0 < d.val_fraction < 1.0:
            raise DubokoError(f"data.val_fraction must be between 0 and 1, got {d.val_fraction!r}")
        if d.split_blocks < 2:
            raise DubokoError(f"data.split_blocks must be >= 2, got {d.split_blocks!r}")
        require_at_least("data", d, 0, "vocab_size", "min_freq", "max_train_tokens", "max_eval_tokens", "eval_batch_size",
                         "sample_tokens")
        if not math.isfinite(d.sample_temperature) or d.sample_temperature < 0:
            raise DubokoError(f"data.sample_temperature must be a finite number >= 0, got {d.sample_temperature!r}")
        block = config.model.get("block_size")
        if block is not None and d.seq_len > int(block):
            fix = (f"lower data.seq_len to {block} at most (the model comes from train.init_from "
                   f"{config.train.init_from!r})" if getattr(config.train, "init_from", "")
                   else f"lower data.seq_len or raise model.block_size to {d.seq_len}")
            raise DubokoError(f"data.seq_len={d.seq_len} is longer than the model's context model.block_size={block}; {fix}")

    # -- data ----------------------------------------------------------------------------------
    @property
    def data(self) -> LMDataConfig:
        return self.config.data

    def setup(self, run_dir: Path | None = None) -> None:
        """`run_dir`: the run being resumed or loaded, or the run a new one starts from
        (train.init_from, e.g. an imported GPT-2): its tokenizer.json is the tokenizer, and the
        corpus (data.path, data.data_dir) is encoded with it instead of training a new one."""
        saved = Path(run_dir) / TOKENIZER_FILE if run_dir is not None else None
        if saved is not None and saved.exists():
            # An existing run: its tokenizer fixes the vocabulary; the corpus is read only when
            # batches or an evaluation are asked for (so `generate` doesn't re-read it).
            self.tokenizer = load_tokenizer(saved)
        else:
            self._load_data(train_new_tokenizer=True)
        self.set_model_field("vocab_size", self.tokenizer.vocab_size)

    def _load_data(self, train_new_tokenizer: bool = False) -> None:
        d = self.data
        if d.data_dir and is_token_folder(d.data_dir):
            self._load_token_folder(train_new_tokenizer)
            return
        text = read_corpus(d.data_dir or d.path or None)
        train_r, val_r = block_split(len(text), d.val_fraction, d.split_blocks, d.split_seed)
        train_texts = [text[a:b] for a, b in train_r]
        val_texts = [text[a:b] for a, b in val_r]
        if train_new_tokenizer:
            # char: the vocabulary is every character of the corpus (so validation has no unknown
            # characters); word/bpe learn from the training blocks only.
            source = text if d.tokenizer == "char" else "".join(train_texts)
            self.tokenizer = train_tokenizer(d.tokenizer, source, d.vocab_size, d.min_freq)
        tok = self.tokenizer
        self.train_ids = torch.tensor([i for t in train_texts for i in tok.encode(t)], dtype=torch.long)
        self.val_ids = torch.tensor([i for t in val_texts for i in tok.encode(t)], dtype=torch.long)
        if d.max_train_tokens > 0:
            self.train_ids = self.train_ids[: d.max_train_tokens]
        if d.max_eval_tokens > 0:
            self.val_ids = self.val_ids[: d.max_eval_tokens]
        first_line = text.lstrip("\n").split("\n", 1)[0][:60]
        self.prompt_text = d.sample_prompt or (first_line + "\n")
        T = d.seq_len
        for name, ids in (("training", self.train_ids), ("validation", self.val_ids)):
            if len(ids) < T + 2:
                raise DubokoError(
                    f"the {name} text has {len(ids)} tokens, too few for data.seq_len={T}; "
                    "use a longer corpus or a smaller seq_len"
                )

    def _load_token_folder(self, train_new_tokenizer: bool) -> None:
        """Memory-map a `duboko prepare-text` folder: nothing is read until batches touch it, so
        start-up time and memory do not depend on the corpus size."""
        d = self.data
        folder = open_token_folder(d.data_dir)
        if train_new_tokenizer or self.tokenizer is None:
            self.tokenizer = folder.tokenizer
        elif self.tokenizer.to_dict() != folder.tokenizer.to_dict():
            raise DubokoError(
                f"the token folder {d.data_dir} was made with another tokenizer than this run's "
                f"({folder.tokenizer.kind}, {folder.tokenizer.vocab_size} tokens vs {self.tokenizer.kind}, "
                f"{self.tokenizer.vocab_size}, from its run folder or train.init_from); resume with the same "
                "token folder, or pass the text itself as data.path"
            )
        self.token_folder = folder.path
        self.train_ids, self.val_ids = folder.train, folder.val
        if d.max_train_tokens > 0:
            self.train_ids = self.train_ids[: d.max_train_tokens]
        if d.max_eval_tokens > 0:
            self.val_ids = self.val_ids[: d.max_eval_tokens]
        head = self.tokenizer.decode(self.train_ids[:200].tolist())
        self.prompt_text = d.sample_prompt or (head.lstrip("\n").split("\n", 1)[0][:60] + "\n")
        T = d.seq_len
        for name, ids in (("training", self.train_ids), ("validation", self.val_ids)):
            if len(ids) < T + 2:
                raise DubokoError(
                    f"the {name} tokens of {d.data_dir} are {len(ids)}, too few for data.seq_len={T}; "
                    "use a longer corpus or a smaller seq_len"
                )

    def _ensure_data(self) -> None:
        if self.train_ids is None:
            self._load_data(train_new_tokenizer=self.tokenizer is None)
            self.set_model_field("vocab_size", self.tokenizer.vocab_size)

    def save_assets(self, run_dir: Path) -> list[str]:
        if self.tokenizer is None:
            return []
        self.tokenizer.save(Path(run_dir) / TOKENIZER_FILE)
        return [TOKENIZER_FILE]

    # -- batches -------------------------------------------------------------------------------
    def _check_world_size(self) -> None:
        # Every rank carries the state of as many streams (the state tensors' batch dimension)
        # and weighs equally in the gradient average.
        B = self.config.train.batch_size
        if B % self.world_size:
            raise DubokoError(
                f"train.batch_size={B} must divide evenly across {self.world_size} processes"
            )

    def _stream_length(self) -> int:
        """Columns per stream in the stateful layout; fixed across epochs (the random start
        offset of each epoch is < seq_len, and seq_len tokens are kept in reserve for it)."""
        B, T = self.config.train.batch_size, self.data.seq_len
        return (len(self.train_ids) - 1 - T) // B

    def num_train_batches(self) -> int:
        self._ensure_data()
        T = self.data.seq_len
        B = self.config.train.batch_size
        self._check_world_size()
        n = self._stream_length() // T if self.data.stateful else ((len(self.train_ids) - 1 - T) // T) // B
        if n < 1:
            raise DubokoError(
                f"{len(self.train_ids)} training tokens make no full batch of "
                f"batch_size={B} x seq_len={T}; lower one of them"
            )
        return n

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        self._ensure_data()
        n = self.num_train_batches()
        T, B = self.data.seq_len, self.config.train.batch_size
        r, w = self.rank, self.world_size
        # One generator per epoch, its draws in a fixed order: the offset, then the row resets
        # (stateful) or the window order (reset). All drawn for the whole epoch up front, so a
        # resumed epoch draws the same.
        g = generator(self.config.train.seed, epoch)
        offset = int(torch.randint(0, T, (1,), generator=g))  # new batch boundaries every epoch
        ids = self.train_ids
        if not torch.is_tensor(ids):  # a memory-mapped token folder
            yield from self._mapped_train_batches(epoch, start, n, g, offset)
            return
        if self.data.stateful:
            L = self._stream_length()
            x_all = rank_slice(ids[offset: offset + B * L].view(B, L), r, w)  # (b, L): b contiguous streams
            y_all = rank_slice(ids[offset + 1: offset + 1 + B * L].view(B, L), r, w)
            # Which rows start a batch from zero state: (n, b) bool.
            row_resets = rank_slice(torch.rand(n, B, generator=g), r, w, dim=1) < self.data.state_reset_prob
            for i in range(start, n):
                cols = slice(i * T, (i + 1) * T)
                yield {
                    "x": x_all[:, cols].to(self.device, non_blocking=True),  # (b, T)
                    "y": y_all[:, cols].to(self.device, non_blocking=True),
                    "reset": i == start,  # fresh state at the epoch start (or a resume point)
                    "reset_rows": row_resets[i].to(self.device),  # (b,) bool
                }
        else:
            windows = (len(ids) - 1 - T) // T
            starts = offset + T * torch.randperm(windows, generator=g)  # shuffled windows
            arange = torch.arange(T)
            for i in range(start, n):
                s = rank_slice(starts[i * B: (i + 1) * B], r, w)  # (b,)
                index = s[:, None] + arange  # (b, T)
                yield {"x": ids[index].to(self.device), "y": ids[index + 1].to(self.device), "reset": True}

    def _mapped_train_batches(self, epoch: int, start: int, n: int, g: torch.Generator,
                              offset: int) -> Iterator[dict[str, Any]]:
        """`train_batches` for a memory-mapped token folder, in memory independent of its size:
        each batch gathers its own (b, T) windows; the per-epoch draws that would grow with the
        corpus (the window order, the row resets) are computed per batch instead (a Feistel
        permutation keyed once per epoch; a generator per batch)."""
        ids = self.train_ids
        T, B = self.data.seq_len, self.config.train.batch_size
        r, w = self.rank, self.world_size
        arange = torch.arange(T)
        rows = rank_slice(torch.arange(B), r, w)  # (b,) this rank's rows of the global batch
        if self.data.stateful:
            L = self._stream_length()
            base = offset + rows * L  # (b,) where each of this rank's streams starts
            for i in range(start, n):
                index = base[:, None] + i * T + arange  # (b, T)
                resets = torch.rand(B, generator=generator(self.config.train.seed, epoch, i))
                yield {
                    "x": gather(ids, index).to(self.device, non_blocking=True),  # (b, T)
                    "y": gather(ids, index + 1).to(self.device, non_blocking=True),
                    "reset": i == start,
                    "reset_rows": (resets[rows] < self.data.state_reset_prob).to(self.device),  # (b,)
                }
        else:
            windows = (len(ids) - 1 - T) // T
            keys = torch.randint(0, 2**31, (4,), generator=g).tolist()
            for i in range(start, n):
                order = feistel_permutation(i * B + rows, windows, keys)  # (b,) shuffled windows
                index = offset + T * order[:, None] + arange  # (b, T)
                yield {"x": gather(ids, index).to(self.device), "y": gather(ids, index + 1).to(self.device),
                       "reset": True}

    # -- model ---------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        fused_lstm = self.config.model.get("cell") == "lstm" and self.config.model.get("implementation") == "fused"
        from duboko.precision import resolve_precision

        precision = resolve_precision(self.config.train.precision, self.device)  # needs the device: not in `check`
        if fused_lstm and self.device.type == "cpu" and precision == "bf16":
            # Measured with torch 2.13: the CPU (oneDNN) LSTM kernel raises "could not create a
            # primitive descriptor" under bf16 autocast. GRU and RNN run.
            raise DubokoError(
                "train.precision='bf16' does not work with torch's fused LSTM on the CPU (its oneDNN "
                "kernel fails); use train.precision=fp32, or model.implementation=readable"
            )
        return super().build_model()

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        x, y = batch["x"], batch["y"]
        if self.data.stateful:
            state = None if batch["reset"] else self._state
            if state is not None and "reset_rows" in batch:
                state = _zero_rows(state, batch["reset_rows"])
            logits, new_state = model(x, state)
            self._state = _detach(new_state)  # truncated BPTT: no gradient into the previous batch
        else:
            logits, _ = model(x)
        logits = logits.float()  # (b, T, V)
        # train.loss is cross-entropy (`check` admits auto | cross_entropy only), smoothed by
        # train.label_smoothing.
        loss = F.cross_entropy(
            logits.flatten(0, 1), y.flatten(), label_smoothing=self.config.train.label_smoothing
        )
        with torch.no_grad():
            correct = (logits.argmax(-1) == y).sum()
        n = y.numel()
        return StepOutput(loss, {"loss_sum": loss.detach() * n, "count": float(n), "accuracy": correct})

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Loss over the validation text ("test" also means it: a corpus has one held-out part)."""
        if split not in ("val", "test"):
            raise unknown_name("split", split, ("val", "test"))
        self._ensure_data()
        ids = self.val_ids
        T = self.data.seq_len
        B = self.data.eval_batch_size or self.config.train.batch_size
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = 0
        count = 0
        try:
            if self.data.stateful:
                B = max(1, min(B, (len(ids) - 1) // T))
                L = (len(ids) - 1) // B
                base = torch.arange(B)[:, None] * L  # (B, 1): B contiguous streams of L tokens
                state = None
                for c in range(0, L, T):
                    index = base + torch.arange(c, min(c + T, L))  # (B, t)
                    x = gather(ids, index).to(self.device)
                    y = gather(ids, index + 1).to(self.device)
                    logits, state = model(x, state)
                    loss_sum += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double().cpu()
                    correct += int((logits.argmax(-1) == y).sum())
                    count += y.numel()
            else:
                windows = (len(ids) - 1) // T
                starts = torch.arange(windows) * T
                arange = torch.arange(T)
                for c in range(0, windows, B):
                    index = starts[c: c + B, None] + arange
                    x, y = gather(ids, index).to(self.device), gather(ids, index + 1).to(self.device)
                    logits, _ = model(x)
                    loss_sum += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double().cpu()
                    correct += int((logits.argmax(-1) == y).sum())
                    count += y.numel()
        finally:
            model.train(was_training)
        loss = float(loss_sum) / max(count, 1)
        result = {"loss": loss, self.score_name: self.score(loss), "accuracy": correct / max(count, 1)}
        self._last_eval = (_fingerprint(model), result)
        return result

    @property
    def score_name(self) -> str:
        """bpc for characters, perplexity for words and BPE tokens."""
        kind = self.tokenizer.kind if self.tokenizer is not None else self.data.tokenizer  # a token folder's wins
        return "bpc" if kind == "char" else "perplexity"

    def score(self, loss: float) -> float:
        return loss / math.log(2) if self.score_name == "bpc" else math.exp(min(loss, 700.0))

    # -- artifacts -----------------------------------------------------------------------------
    def sample_text(self, model: nn.Module, max_new_tokens: int, seed: int, prompt: str | None = None,
                    temperature: float | None = None) -> str:
        """Prompt + sampled continuation (for samples/*.txt)."""
        from duboko.nn.sampling import generate

        model = getattr(model, "module", model)  # unwrap DDP
        prompt = self.prompt_text if prompt is None else prompt
        prompt = prompt or "\n"
        ids = self.tokenizer.encode(prompt)
        new = generate(
            model, ids, max_new_tokens,
            temperature=self.data.sample_temperature if temperature is None else temperature,
            seed=seed,
        )
        return prompt + self.tokenizer.decode(new)

    def epoch_end(self, model: nn.Module, epoch: int, run_dir: Path | None) -> dict[str, float]:
        if run_dir is not None and self.rank == 0 and self.data.sample_tokens > 0:
            text = self.sample_text(model, self.data.sample_tokens, seed=self.config.train.seed + epoch)
            atomic_write_text(Path(run_dir) / "samples" / f"epoch_{epoch}.txt", text)
        return {}

    def final_metrics(self, model: nn.Module, run_dir: Path | None, history: list[dict]) -> Evaluation:
        # The engine (and `duboko eval`) evaluated this very model just before: reuse that pass.
        cached = getattr(self, "_last_eval", None)
        m = cached[1] if cached and cached[0] == _fingerprint(model) else self.evaluate(model, "val")
        self._ensure_data()
        out = {
            "val_loss": m["loss"],
            f"val_{self.score_name}": m[self.score_name],
            "val_accuracy": m["accuracy"],
            "tokenizer": self.tokenizer.kind,
            "vocab_size": self.tokenizer.vocab_size,
            "train_tokens": int(len(self.train_ids)),
            "val_tokens": int(len(self.val_ids)),
        }
        if run_dir is not None and self.rank == 0 and self.data.sample_tokens > 0:
            text = self.sample_text(model, self.data.sample_tokens, seed=self.config.train.seed)
            atomic_write_text(Path(run_dir) / "samples" / "final.txt", text)
        return Evaluation(out)


def _fingerprint(model: nn.Module) -> tuple:
    """Identifies a model and the current values of its weights: every in-place update (an
    optimizer step, load_state_dict) bumps a tensor's version counter."""
    return (id(model), tuple(p._version for p in model.parameters()))


def _zero_rows(state: Any, rows: torch.Tensor) -> Any:
    """Zero the batch rows `rows` (b,) bool of a state: a (layers, b, H) tensor or a tuple of them."""
    if torch.is_tensor(state):
        return state.masked_fill(rows[None, :, None], 0.0)  # no `rows.any()` check: it would sync a GPU
    if isinstance(state, (tuple, list)):
        return type(state)(_zero_rows(s, rows) for s in state)
    return state


def _detach(state: Any) -> Any:
    """Detach a state that may be a tensor, a tuple/list of tensors, or None."""
    if state is None:
        return None
    if torch.is_tensor(state):
        return state.detach()
    if isinstance(state, (tuple, list)):
        return type(state)(_detach(s) for s in state)
    return state
