"""A training process for the distributed tests (tests/test_train_fsdp.py, test_train_elastic.py,
test_train_accum.py), run as `python tests/torchrun_worker.py ...` or under
`python -m torch.distributed.run --nproc_per_node=N tests/torchrun_worker.py ...`.

It trains the language-model task through the real engine (`duboko.train.engine.fit`), with a
task subclass, "recording-lm", that also writes down what each rank saw: the rows of every
training batch it received (token ids) and every micro-batch loss. That lets a test check sample
coverage across an elastic resume, which the engine's own outputs cannot show.

    torchrun_worker.py RECORD_FILE_PREFIX RUN_FOLDER [--resume] [key=value ...]

A new run starts from the shakespeare-gpt recipe with task = "recording-lm"; a resume rebuilds
from the run folder's config.json. Each rank writes RECORD_FILE_PREFIX.rank{R}.json at the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from duboko import config as C
from duboko.registry import register_task
from duboko.tasks.language_model import LanguageModelTask
from duboko.train.engine import fit

RECIPE = Path(__file__).resolve().parents[1] / "src" / "duboko" / "recipes" / "shakespeare-gpt.toml"


@register_task
class RecordingLM(LanguageModelTask):
    name = "recording-lm"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[list[int]] = []  # rows (windows of token ids) of the batches handed out
        self.losses: list[float] = []  # every micro-batch's loss, in order

    def train_batches(self, epoch, start=0):
        for batch in super().train_batches(epoch, start):
            self.seen.extend(batch["x"].tolist())
            yield batch

    def training_step(self, model, batch):
        out = super().training_step(model, batch)
        self.losses.append(float(out.loss.detach()))
        return out


def main(argv: list[str]) -> None:
    prefix, out = argv[0], Path(argv[1])
    resume = "--resume" in argv
    overrides = [a for a in argv[2:] if a != "--resume"]
    if resume:
        cfg = C.resolve(out, overrides, resume=True)
    else:
        import tomllib

        raw = tomllib.loads(RECIPE.read_text())
        raw["task"] = "recording-lm"
        raw["recipe"] = "shakespeare-gpt"
        cfg = C.resolve(raw, overrides)
    captured = {}
    real_init = RecordingLM.__init__

    def remember(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        captured["task"] = self

    RecordingLM.__init__ = remember
    fit(cfg, out, resume=resume, quiet=True)
    task = captured["task"]
    record = {"rank": task.rank, "world_size": task.world_size, "seen": task.seen, "losses": task.losses,
              "threads": torch.get_num_threads()}
    Path(f"{prefix}.rank{task.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1:])
