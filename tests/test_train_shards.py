"""Sharded checkpoints in the Hugging Face layout (`train.checkpoint_layout = sharded`, #18).

A 2-rank FSDP run (gloo, CPU, the tiny GPT of tests/torchrun_launch.py) saves per-rank shards:
`model-0000k-of-00002.safetensors` + `model.safetensors.index.json` for the weights,
`state-0000k-of-00002.safetensors` + the head `state.safetensors` for the training state. The
tests check that

- the shards hold exactly the tensors a full-layout save of the same run gathers to rank 0
  (bit-equal: the layout does not change what is trained);
- transformers' own sharded loader (`load_sharded_checkpoint`: index -> files -> tensors) reads
  the weights, and a by-hand read of the index with `safetensors` + `json` gives the same;
- the run resumes on 1 rank and on 2 ranks and ends where an uninterrupted 1-process run of the
  full layout ends, within the tolerances of tests/test_train_elastic.py (weights 1e-4
  absolute, losses 1e-4 relative), every window of the epoch seen once across the switch;
- `duboko eval` / `generate` / `verify` on the sharded folder give what they give on the
  full-layout folder;
- a tampered index or shard (a file outside the folder, a missing or extra tensor, a shard from
  another save) is one clear error, even when the manifest was rewritten to match.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from duboko import registry
from duboko.cli.main import main
from duboko.errors import DubokoError
from duboko.io import load_tensors
from duboko.train import checkpoint as ckpt
from duboko.train import run as run_module
from duboko.train.run import read_history, write_manifest
from duboko.train.verify import verify_run
from torchrun_launch import TINY_GPT, launch
import torchrun_worker  # noqa: F401  (registers "recording-lm", the runs' task, for in-process loads)

pytestmark = pytest.mark.slow
SWITCH = 3  # optimizer steps before the save (of 8 in the epoch)
FSDP = TINY_GPT + ["train.strategy=fsdp"]

# `duboko eval` / `generate` read run folders through duboko.train.run.load_run: until it routes
# its weights through `checkpoint.load_weights` (the edit in the B2 report) they refuse a sharded
# folder. Expected to fail until then, and run as a normal test from then on.
_ROUTED = "load_weights" in Path(run_module.__file__).read_text()
needs_routed_loader = pytest.mark.xfail(not _ROUTED, strict=True,
                                        reason="duboko.train.run.load_run does not read sharded folders yet")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs: the uninterrupted 1-process reference (full layout, the whole epoch), and the
    same 2-rank FSDP run stopped after SWITCH steps in the full and in the sharded layout."""
    tmp = tmp_path_factory.mktemp("shards")
    (ref,) = launch(1, tmp / "ref", tmp / "reference", TINY_GPT)
    full = launch(2, tmp / "full", tmp / "full2", FSDP + ["train.checkpoint_layout=full", f"train.max_steps={SWITCH}"])
    sharded = launch(2, tmp / "sharded", tmp / "sharded2",
                     FSDP + ["train.checkpoint_layout=sharded", f"train.max_steps={SWITCH}"])
    return {"tmp": tmp, "reference": (tmp / "reference", ref), "full": (tmp / "full2", full),
            "sharded": (tmp / "sharded2", sharded)}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".duboko.lock"))
    return dst


def _plain_model(run: Path) -> torch.nn.Module:
    cfg = json.loads((run / "config.json").read_text())["model"]
    return registry.build_model(cfg.pop("name"), cfg)


def test_sharded_save_holds_what_the_full_layout_gathers(runs):
    full, sharded = runs["full"][0], runs["sharded"][0]
    names = sorted(p.name for p in sharded.iterdir() if p.suffix in (".safetensors", ".json"))
    assert names == ["config.json", "manifest.json", "metrics.json",
                     "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json",
                     "state-00001-of-00002.safetensors", "state-00002-of-00002.safetensors", "state.safetensors",
                     "tokenizer.json"]
    assert not list(sharded.glob(".*.tmp"))  # every temporary shard was renamed
    # Each rank wrote a share of the bytes; each file holds whole tensors.
    weight_map, meta = ckpt.read_weights_index(sharded)
    sizes = [(sharded / f).stat().st_size for f in sorted(set(weight_map.values()))]
    assert min(sizes) > 0.25 * sum(sizes), sizes
    reference = load_tensors(full / "model.safetensors")
    assert meta["total_size"] == sum(t.numel() * t.element_size() for t in reference.values())
    for file in set(weight_map.values()):
        with safe_open(str(sharded / file), framework="pt") as f:
            for key in f.keys():
                assert tuple(f.get_slice(key).get_shape()) == tuple(reference[key].shape)
    # The training state: model weights, Adam moments and steps, equal bit for bit.
    (t_full, m_full), (t_shard, m_shard) = ckpt.load_state(full, torch.device("cpu")), ckpt.load_state(sharded, torch.device("cpu"))
    assert m_shard["layout"] == "sharded" and m_shard["world_size"] == 2 and m_shard["step"] == SWITCH
    assert t_full.keys() == t_shard.keys()
    for key in t_full:
        assert torch.equal(t_full[key], t_shard[key]), key
    assert m_full["optimizer"]["param_groups"] == m_shard["optimizer"]["param_groups"]
    # The state's shards hold model/ and optim/ tensors only; the head the RNG states.
    with safe_open(str(sharded / "state.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["rng/0", "rng/1"]
    # The manifest lists every shard and the index; verify checks them.
    listed = json.loads((sharded / "manifest.json").read_text())["sha256"]
    assert set(names) - {"manifest.json"} <= set(listed)
    assert verify_run(sharded)["ok"]
    assert main(["verify", str(sharded)]) == 0


def test_a_hugging_face_reader_loads_the_weights(runs):
    """transformers' `load_sharded_checkpoint` (index -> files -> load_state_dict), and the same
    by hand with json + safetensors, give the tensors of the gathered state dict."""
    from safetensors.torch import load_file
    from transformers.trainer_utils import load_sharded_checkpoint

    full, sharded = runs["full"][0], runs["sharded"][0]
    gathered = load_tensors(full / "model.safetensors")
    model = _plain_model(sharded)
    result = load_sharded_checkpoint(model, str(sharded), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in model.state_dict().items():
        assert torch.equal(value, gathered[key]), key
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    by_hand = {}
    for file in sorted(set(index["weight_map"].values())):
        by_hand.update(load_file(str(sharded / file)))
    assert by_hand.keys() == set(index["weight_map"]) == gathered.keys()
    assert all(torch.equal(by_hand[k], gathered[k]) for k in gathered)
    assert all(torch.equal(v, gathered[k]) for k, v in ckpt.load_weights(sharded).items())


@pytest.mark.parametrize("after", [1, 2])
def test_resume_on_any_world_size_matches_the_full_layout(runs, tmp_path, after):
    ref_run, ref = runs["reference"]
    saved_run, first = runs["sharded"]
    run = _copy(saved_run, tmp_path / "run")
    second = launch(after, tmp_path / "second", run, ["train.max_steps=0"], resume=True)
    before_rows = [tuple(row) for r in first for row in r["seen"]]
    after_rows = [tuple(row) for r in second for row in r["seen"]]
    assert len(before_rows) == SWITCH * 16 and len(after_rows) == (8 - SWITCH) * 16
    assert Counter(before_rows + after_rows) == Counter(tuple(row) for row in ref["seen"])

    metrics, ref_metrics = (json.loads((r / "metrics.json").read_text()) for r in (run, ref_run))
    assert metrics["world_size"] == after and metrics["steps"] == ref_metrics["steps"] == 8
    assert metrics["val_loss"] == pytest.approx(ref_metrics["val_loss"], rel=1e-4)
    row, (ref_row,) = read_history(run)[-1], read_history(ref_run)
    assert row["train_loss"] == pytest.approx(ref_row["train_loss"], rel=1e-4)
    # The resumed run saved sharded again (config.json keeps the layout), on its own world size:
    # the other world size's shards are gone.
    shards = sorted(p.name for p in run.glob("*-of-*.safetensors"))
    assert shards == [ckpt.shard_name(kind, k, after) for kind in ("model", "state") for k in range(1, after + 1)]
    w, w_ref = ckpt.load_weights(run), load_tensors(ref_run / "model.safetensors")
    assert w.keys() == w_ref.keys()
    diff = max((w[k] - w_ref[k]).abs().max().item() for k in w)
    assert diff < 1e-4, diff
    assert verify_run(run)["ok"]


def test_full_layout_resume_removes_the_shards(runs, tmp_path):
    """A sharded run resumed with the full layout (1 process, strategy ddp) writes
    state.safetensors and model.safetensors, and the shards it replaces go."""
    run = _copy(runs["sharded"][0], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["train"]["checkpoint_layout"] = "full"  # as a user would, by hand, before resuming
    (run / "config.json").write_text(json.dumps(config))
    write_manifest(run, ["tokenizer.json", *ckpt.layout_files(run)])
    launch(1, tmp_path / "rec", run, ["train.max_steps=0"], resume=True)
    assert not ckpt.layout_files(run)
    assert (run / "model.safetensors").is_file() and verify_run(run)["ok"]
    assert ckpt.load_state(run, torch.device("cpu"))[1].get("layout") is None


@needs_routed_loader
def test_eval_and_generate_of_the_sharded_run_equal_the_gathered_one(runs, tmp_path, capsys):
    outputs = []
    for name in ("full", "sharded"):
        # `generate` takes language-model runs: the recording task is that task plus a record.
        run = _copy(runs[name][0], tmp_path / name)
        config = json.loads((run / "config.json").read_text())
        config["task"] = "language-model"
        (run / "config.json").write_text(json.dumps(config))
        write_manifest(run, ["tokenizer.json", *ckpt.layout_files(run)])
        assert main(["eval", str(run), "--json", "--device", "cpu"]) == 0
        metrics = json.loads(capsys.readouterr().out)
        metrics.pop("run")
        assert main(["generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--temperature", "0",
                     "--device", "cpu"]) == 0
        outputs.append((metrics, capsys.readouterr().out))
    assert outputs[0] == outputs[1]
    assert "val_loss" in outputs[0][0] and len(outputs[0][1]) > 40


# -- tampering ----------------------------------------------------------------------------------
def _tampered(runs, tmp_path) -> Path:
    return _copy(runs["sharded"][0], tmp_path / "run")


def _rewrite_manifest(run: Path) -> None:
    """The attacker also rewrites the manifest: the loader's own checks must still hold."""
    write_manifest(run, ["tokenizer.json", *ckpt.layout_files(run)])


def _edit_index(run: Path, edit) -> None:
    path = run / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "model-00003-of-00002.safetensors"])
def test_an_index_naming_a_file_outside_the_set_is_refused(runs, tmp_path, target):
    run = _tampered(runs, tmp_path)
    (tmp_path / "outside.safetensors").write_bytes((run / "model-00001-of-00002.safetensors").read_bytes())
    _edit_index(run, lambda wm: wm.update({next(iter(wm)): target}))
    _rewrite_manifest(run)
    with pytest.raises(DubokoError, match="expected a file of this folder named model-NNNNN-of-NNNNN|one set of"):
        ckpt.load_weights(run)
    assert main(["verify", str(run)]) == 2


def test_a_tensor_missing_from_the_index_or_a_shard_is_refused(runs, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run = _tampered(runs, tmp_path)
    _edit_index(run, lambda wm: wm.pop("decoder.layers.0.ln1.bias"))
    _rewrite_manifest(run)
    with pytest.raises(DubokoError, match="holds decoder.layers.0.ln1.bias not in the index"):
        ckpt.load_weights(run)
    # A shard rewritten without one of its tensors, the index left alone.
    run = _copy(runs["sharded"][0], tmp_path / "run2")
    weight_map, _ = ckpt.read_weights_index(run)
    name, file = sorted(weight_map.items())[0]
    tensors = load_file(str(run / file))
    del tensors[name]
    save_file(tensors, str(run / file), metadata={"format": "pt"})
    _rewrite_manifest(run)
    with pytest.raises(DubokoError, match=f"lacks {name}"):
        ckpt.load_weights(run)
    assert main(["verify", str(run)]) == 2
    assert f"lacks {name}" in capsys.readouterr().err


def test_a_state_shard_from_another_save_is_refused_on_resume(runs, tmp_path):
    """A state shard swapped for the same rank's shard of another save (a crash between the
    renames, or a hand-made mix), with a rewritten manifest: the head's digests refuse it."""
    run = _tampered(runs, tmp_path)
    other = _copy(runs["sharded"][0], tmp_path / "other")
    # "another save": the same tensors, the first Adam step count changed.
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(other / "state-00001-of-00002.safetensors"))
    key = next(k for k in sorted(tensors) if k.endswith("/step"))
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(run / "state-00001-of-00002.safetensors"))
    _rewrite_manifest(run)
    with pytest.raises(DubokoError, match="different saves"):
        ckpt.load_state(run, torch.device("cpu"))
    from duboko import config as C
    from duboko.train.engine import Trainer

    with pytest.raises(DubokoError, match="state-00001-of-00002.safetensors does not match the digest .* different saves"):
        Trainer(C.resolve(run, [], resume=True), run, resume=True, quiet=True)


def test_unlisted_shard_is_refused_before_parsing(runs, tmp_path):
    """A shard added after the run (not in the manifest) stops every load before it is read."""
    run = _tampered(runs, tmp_path)
    shutil.copy(run / "model-00001-of-00002.safetensors", run / "model-00001-of-00001.safetensors")
    with pytest.raises(DubokoError, match="not listed in manifest.json"):
        verify_run(run)


# -- units ----------------------------------------------------------------------------------------
def test_streamed_shards_are_valid_safetensors(tmp_path):
    """write_shards' own safetensors writer (streamed, no whole-file buffer) against the
    library's reader, for every dtype duboko saves, 0-d and empty tensors, 1 and 3 "ranks"."""
    from safetensors.torch import load_file

    tensors = {
        "a": torch.randn(5, 3), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4),
        "d": torch.tensor(3.5), "e": torch.zeros(0, 4), "f": torch.tensor([True, False]),
        "g": torch.randn(2, 2).half(), "h": torch.randint(0, 200, (9,), dtype=torch.uint8),
        "i": torch.randn(3, 4).t(),  # not contiguous
    }
    for world in (1, 3):
        out = tmp_path / f"w{world}"
        out.mkdir()
        maps = []
        for rank in range(world):
            weight_map, files, tmp, digest = ckpt.write_shards(out, "model", tensors, rank, world, {"format": "pt"})
            maps.append(weight_map)
            if tmp is not None:
                Path(tmp).rename(out / files[rank])
        assert all(m == maps[0] for m in maps)  # every rank computes the same assignment
        back = {}
        for file in sorted(set(maps[0].values())):
            back.update(load_file(str(out / file)))
        assert back.keys() == tensors.keys()
        for k, v in tensors.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_layout_choice():
    big = ckpt.SHARD_THRESHOLD_BYTES
    assert ckpt.choose_layout("auto", "fsdp", 2, big) == "sharded"
    assert ckpt.choose_layout("auto", "fsdp", 2, big - 1) == "full"
    assert ckpt.choose_layout("auto", "fsdp", 1, big) == "full"
    assert ckpt.choose_layout("auto", "ddp", 8, 100 * big) == "full"
    assert ckpt.choose_layout("sharded", "ddp", 1, 0) == "sharded"
    assert ckpt.choose_layout("full", "fsdp", 8, 100 * big) == "full"
    with pytest.raises(DubokoError, match="train.checkpoint_layout 'shard'; expected one of auto, full, sharded"):
        ckpt.choose_layout("shard", "fsdp", 2, 0)
    owners = ckpt.assign_owners([("a", 10), ("b", 10), ("c", 10), ("d", 10)], 2)
    assert owners == {"a": 0, "b": 0, "c": 1, "d": 1}
    assert set(ckpt.assign_owners([("a", 1000), ("b", 1)], 4).values()) <= {0, 1, 2, 3}
