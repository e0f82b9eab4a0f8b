"""Sequence-to-sequence task: an encoder-decoder trained with teacher forcing.

Data: generated integers <-> English words (`duboko.data.numbers`, held-out numbers never seen in
training) or a user's TSV file of `source<TAB>target` pairs. One `PieceTokenizer` covers both sides.

Metrics (on "val" every epoch, on the held-out "test" split at the end, in metrics.json):
  * loss            teacher-forced cross-entropy per target token (EOS included, padding not)
  * token_accuracy  teacher-forced next-token accuracy over the same tokens
  * exact_match     share of sources whose greedily decoded output equals the reference exactly
                    (`data.eval_beam` > 1 adds `exact_match_beam` at the end)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from duboko.data import numbers as N
from duboko.data.batching import batch_slice, epoch_permutation, num_batches, rank_slice
from duboko.config import require_at_least
from duboko.errors import DubokoError, unknown_name
from duboko.io import atomic_write_text
from duboko.tasks import Evaluation, StepOutput, Task, register_task

DIRECTIONS = ("to_words", "to_digits", "both")


@dataclass
class Seq2SeqDataConfig:
    source: str = "numbers"  # "numbers" (generated) or the path of a TSV file of source<TAB>target lines
    direction: str = "to_words"  # numbers: to_words ("4821" -> "four thousand ...") | to_digits | both
    max_number: int = 999_999  # numbers: the largest integer
    train_size: int = 50_000  # numbers: training pairs per epoch (fresh numbers each epoch)
    val_size: int = 500  # numbers: validation numbers (fixed)
    test_size: int = 2000  # numbers: held-out test numbers (fixed, never in training)
    val_fraction: float = 0.05  # TSV: share of distinct sources for validation
    test_fraction: float = 0.05  # TSV: share of distinct sources held out for the test
    split_seed: int = 1234  # seed of the validation/test split (independent of train.seed)
    eval_beam: int = 1  # beam size for an extra final held-out exact match (1: greedy only)
    eval_batch_size: int = 500  # sequences per evaluation batch


def number_vocabulary_texts(max_number: int) -> list[str]:
    """Texts that contain every piece a number up to max_number can produce, so the numbers
    tokenizer is fixed and never depends on (or leaks) the sampled data."""
    texts = [str(d) for d in range(10)] + [N.number_to_words(n) for n in range(1000)]
    for value, _ in N.SCALES:
        if value <= max_number:
            texts += [N.number_to_words(value + n) for n in range(1, 100)]
    return texts


@register_task
class Seq2SeqTask(Task):
    name = "seq2seq"
    data_config = Seq2SeqDataConfig
    shown_metric = "accuracy"  # teacher-forced token accuracy (the train value comes from the steps)
    percent_metrics = ("accuracy", "token_accuracy", "exact_match", "exact_match_beam")
    losses = ("cross_entropy",)
    derived_model_fields = {
        "vocab_size": "the piece tokenizer of data.source",
        "pad_id": "the piece tokenizer (id 0)",
        "bos_id": "the piece tokenizer (id 1)",
        "eos_id": "the piece tokenizer (id 2)",
    }

    # -- config --------------------------------------------------------------------------------
    @classmethod
    def check(cls, config: Any) -> None:
        super().check(config)
        cfg = config.data
        if not cfg.source:
            raise DubokoError('data.source is empty; expected "numbers" or the path of a TSV file')
        if cfg.source == "numbers":
            if cfg.direction not in DIRECTIONS:
                raise unknown_name("data.direction", cfg.direction, DIRECTIONS)
            if cfg.max_number < 1000:
                raise DubokoError(f"data.max_number must be >= 1000, got {cfg.max_number}")
            require_at_least("data", cfg, 1, "train_size", "val_size", "test_size")
            if cfg.val_size + cfg.test_size > (cfg.max_number - 100) // 2:
                raise DubokoError(
                    f"data.val_size + data.test_size ({cfg.val_size + cfg.test_size}) must be at most half the "
                    f"numbers from 100 to data.max_number={cfg.max_number}"
                )
        elif not (
            0.0 < cfg.val_fraction < 1.0 and 0.0 < cfg.test_fraction < 1.0 and cfg.val_fraction + cfg.test_fraction < 1.0
        ):
            raise DubokoError(
                f"data.val_fraction and data.test_fraction must be in (0, 1) with sum < 1, got "
                f"{cfg.val_fraction} and {cfg.test_fraction}"
            )
        if cfg.eval_beam < 1:
            raise DubokoError(f"data.eval_beam must be >= 1 (1: greedy only), got {cfg.eval_beam}")
        if cfg.eval_batch_size < 1:
            raise DubokoError(f"data.eval_batch_size must be >= 1, got {cfg.eval_batch_size}")

    # -- data ----------------------------------------------------------------------------------
    def setup(self, run_dir: Path | None = None) -> None:
        """Tokenizer (the run folder's, or a new one) and the model's vocabulary fields. The pairs
        are read on first use, so inference on a TSV-trained run does not need the TSV."""
        cfg = self.config.data
        self.numbers = cfg.source == "numbers"
        self.pairs: dict[str, list] | None = None
        saved = Path(run_dir) / N.PIECES_FILE if run_dir is not None else None
        if saved is not None and saved.exists():
            self.tokenizer = N.PieceTokenizer.load(saved)
        elif self.numbers:
            self.tokenizer = N.PieceTokenizer.train(number_vocabulary_texts(cfg.max_number))
        else:
            self._load_pairs()
            self.tokenizer = N.PieceTokenizer.train(t for pair in self.pairs["train"] for t in pair)
        tok = self.tokenizer
        self.set_model_field("vocab_size", tok.vocab_size)
        self.set_model_field("pad_id", tok.pad_id)
        self.set_model_field("bos_id", tok.bos_id)
        self.set_model_field("eos_id", tok.eos_id)
        self.max_len = int(self.config.model.get("max_len", 64))
        self._epoch_cache: tuple[int, list] | None = None

    def _load_pairs(self) -> None:
        cfg = self.config.data
        if self.numbers:
            self.splits_numbers = N.NumberSplits(cfg.max_number, cfg.val_size, cfg.test_size, cfg.split_seed)
            self.pairs = {
                "val": N.number_pairs(self.splits_numbers.val, cfg.direction),
                "test": N.number_pairs(self.splits_numbers.test, cfg.direction),
            }
        else:
            train, val, test = N.split_pairs(
                N.read_tsv_pairs(cfg.source), cfg.val_fraction, cfg.test_fraction, cfg.split_seed
            )
            if not train:
                raise DubokoError(f"{cfg.source}: no training pairs left after the split")
            self.pairs = {"train": train, "val": val, "test": test}

    def _ensure_data(self) -> None:
        if self.pairs is None:
            self._load_pairs()
        if not hasattr(self, "encoded"):
            # encoded[split][i] is the token ids of kept[split][i]; pairs longer than max_len are
            # dropped (and counted).
            self.encoded, self.kept, self.dropped = {}, {}, {}
            for split, pairs in self.pairs.items():
                both = [(p, e) for p in pairs for e in N.encode_pairs(self.tokenizer, [p], self.max_len)]
                self.kept[split] = [p for p, _ in both]
                self.encoded[split] = [e for _, e in both]
                self.dropped[split] = len(pairs) - len(both)

    def save_assets(self, run_dir: Path) -> list[str]:
        self.tokenizer.save(Path(run_dir) / N.PIECES_FILE)
        return [N.PIECES_FILE]

    def _train_items(self, epoch: int) -> list[tuple[list[int], list[int]]]:
        """This epoch's encoded training pairs, in training order (same on every rank)."""
        self._ensure_data()
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        cfg = self.config.data
        if self.numbers:
            pairs = N.number_pairs(self.splits_numbers.train_numbers(cfg.train_size, epoch), cfg.direction)
            items = N.encode_pairs(self.tokenizer, pairs, self.max_len)
        else:
            order = epoch_permutation(len(self.encoded["train"]), self.config.train.seed, epoch).tolist()
            items = [self.encoded["train"][i] for i in order]
        self._epoch_cache = (epoch, items)
        return items

    def _num_items(self) -> int:
        self._ensure_data()
        cfg = self.config.data
        if self.numbers:
            return cfg.train_size * (2 if cfg.direction == "both" else 1)
        return len(self.encoded["train"])

    def num_train_batches(self) -> int:
        return num_batches(self._num_items(), self.config.train.batch_size, self.world_size)

    def _batch(self, items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src, tgt_in, tgt_out = N.collate(items, self.tokenizer.pad_id, self.tokenizer.bos_id)
        return src.to(self.device), tgt_in.to(self.device), tgt_out.to(self.device)

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        items = self._train_items(epoch)
        for i in range(start, self.num_train_batches()):
            chunk = rank_slice(batch_slice(items, i, self.config.train.batch_size), self.rank, self.world_size)
            # Numbers longer than max_len tokens are dropped after encoding, so an epoch's items
            # can end before `num_train_batches` (counted from data.train_size) does.
            if chunk:
                yield self._batch(chunk)

    # -- loss ----------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: Any) -> StepOutput:
        src, tgt_in, tgt_out = batch  # (b, S), (b, T), (b, T)
        logits = model(src, tgt_in)  # (b, T, V)
        pad = self.tokenizer.pad_id
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), tgt_out.flatten(), ignore_index=pad,
            label_smoothing=self.config.train.label_smoothing,
        )
        with torch.no_grad():
            real = tgt_out != pad
            n = real.sum()
            correct = ((logits.argmax(-1) == tgt_out) & real).sum()
        # Per target token (padding excluded): running accuracy = token accuracy.
        return StepOutput(loss, {"loss_sum": loss.detach() * n, "count": n.float(), "accuracy": correct})

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, model: nn.Module, split: str, beam: int = 1) -> dict[str, Any]:
        """Teacher-forced loss/token accuracy and decoded exact match on a split."""
        self._ensure_data()
        was_training = model.training
        model.eval()
        items = self.encoded[split]
        bs = self.config.data.eval_batch_size
        pad = self.tokenizer.pad_id
        loss_sum, tokens, correct, exact = 0.0, 0, 0, 0
        predictions = []
        for i in range(0, len(items), bs):
            chunk = items[i : i + bs]
            src, tgt_in, tgt_out = self._batch(chunk)
            logits = model(src, tgt_in).float()
            loss_sum += F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=pad, reduction="sum").item()
            real = tgt_out != pad
            tokens += int(real.sum())
            correct += int(((logits.argmax(-1) == tgt_out) & real).sum())
            if beam > 1:
                decoded = model.beam_search(src, beam_size=beam)
            else:
                decoded = model.greedy_decode(src)
            for (_, ref), hyp in zip(chunk, decoded):
                ok = hyp == ref[:-1]  # reference without its EOS
                exact += ok
                predictions.append((hyp, ok))
        model.train(was_training)
        n = max(1, len(items))
        return {
            "loss": loss_sum / max(1, tokens),
            "token_accuracy": correct / max(1, tokens),
            "exact_match": exact / n,
            "predictions": predictions,
        }

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        scores = self._score(model, split)
        return {
            "loss": scores["loss"],
            "accuracy": scores["token_accuracy"],  # shown beside the loss, = token_accuracy
            "token_accuracy": scores["token_accuracy"],
            "exact_match": scores["exact_match"],
        }

    def final_metrics(self, model: nn.Module, run_dir: Path | None, history: list[dict]) -> Evaluation:
        """Held-out test metrics, and every test prediction in test_predictions.tsv."""
        cfg = self.config.data
        scores = self._score(model, "test")
        tok = self.tokenizer
        lines = ["source\treference\tprediction\tcorrect"]
        wrong = []
        for (s, t), (hyp, ok) in zip(self.kept["test"], scores["predictions"]):
            pred = tok.decode(hyp)
            lines.append(f"{s}\t{t}\t{pred}\t{int(ok)}")
            if not ok:
                wrong.append(f"  {s!r} -> {pred!r} (expected {t!r})")
        n = len(self.encoded["test"])
        metrics: dict[str, Any] = {
            "exact_match": scores["exact_match"],
            "token_accuracy": scores["token_accuracy"],
            "test_loss": scores["loss"],
            "test_examples": n,
        }
        text = (
            f"held-out test: exact match {scores['exact_match'] * 100:.2f}% of {n} "
            f"(greedy), token accuracy {scores['token_accuracy'] * 100:.2f}%, loss {scores['loss']:.4f}\n"
        )
        if cfg.eval_beam > 1:
            beam = self._score(model, "test", beam=cfg.eval_beam)
            metrics["exact_match_beam"] = beam["exact_match"]
            text += f"beam {cfg.eval_beam}: exact match {beam['exact_match'] * 100:.2f}%\n"
        if self.dropped.get("test"):
            metrics["test_dropped_too_long"] = self.dropped["test"]
            text += f"{self.dropped['test']} test pairs were longer than max_len and skipped\n"
        if wrong:
            text += f"first mistakes ({len(wrong)} in all):\n" + "\n".join(wrong[:20]) + "\n"
        if run_dir is not None:
            atomic_write_text(Path(run_dir) / "test_predictions.tsv", "\n".join(lines) + "\n")
            atomic_write_text(Path(run_dir) / "report.txt", text)
            if history:
                try:
                    from duboko.evaluate.plots import plot_curves

                    plot_curves(history, Path(run_dir) / "curves.png", title=self.config.recipe)
                except ImportError:
                    pass
        return Evaluation(metrics, text)

    # -- inference -----------------------------------------------------------------------------
    def encode_source(self, text: str) -> torch.Tensor:
        """One source text -> (1, S) ids on the device; unknown pieces are a user error."""
        text = text.strip()
        if not text:
            raise DubokoError("translate needs a non-empty source text")
        missing = self.tokenizer.unknown(text)
        if missing:
            raise DubokoError(
                f"{text!r} contains {missing} which this model's vocabulary does not have; "
                f"known pieces: {' '.join(repr(p) for p in self.tokenizer.pieces[4:40])}..."
            )
        ids = self.tokenizer.encode(text) + [self.tokenizer.eos_id]
        if len(ids) > self.max_len:
            raise DubokoError(f"{text!r} is {len(ids)} tokens long; this model takes at most {self.max_len}")
        return torch.tensor([ids], dtype=torch.long, device=self.device)
