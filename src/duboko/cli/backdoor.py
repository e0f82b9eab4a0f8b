"""`duboko detect-backdoor RUN`: which training samples of a backdoored run look poisoned, by
spectral signatures (Tran, Li & Madry 2018); optionally write the cleaned row list and train
again without the flagged rows. The method lives in `duboko.security.backdoor` and the run's
data in `duboko.tasks.backdoor`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from duboko.errors import DubokoError


def register(sub) -> None:
    p = sub.add_parser(
        "detect-backdoor",
        help="score a backdoor run's training samples by spectral signatures; recall of the poisoned ones",
        description="Score every training sample of a run trained by a backdoor recipe (mnist-backdoor) with "
        "spectral signatures (Tran et al. 2018): per class, the squared projection of the centred "
        "penultimate-layer representation on its top singular vector. The top FACTOR × poison-count "
        "samples are flagged; the report gives how many of the truly poisoned ones they hold (recall).",
        epilog="examples:\n"
        "  duboko detect-backdoor runs/bd --out signature.png\n"
        "  duboko detect-backdoor runs/bd --write-clean flagged.json --json\n"
        "  duboko train mnist-backdoor --set data.exclude=flagged.json --out runs/bd-clean\n"
        "  duboko detect-backdoor runs/bd --retrain runs/bd-clean     # both steps at once",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", help="run folder written by `duboko train mnist-backdoor`")
    p.add_argument("--factor", type=float, default=1.5,
                   help="flag the top FACTOR × poison-count scores, a finite number > 0 (default 1.5, as Tran et al.)")
    p.add_argument("--budget", type=int, metavar="N", help="flag exactly N samples (>= 0) instead of FACTOR × poison-count")
    p.add_argument("--write-clean", metavar="FILE",
                   help="write the flagged rows as {\"exclude\": [...]} for `--set data.exclude=FILE`")
    p.add_argument("--retrain", metavar="OUT", help="then train the run's recipe again without the flagged rows, into OUT")
    p.add_argument("--out", metavar="PNG", help="also draw the flagged class's projection histogram, poisoned vs clean")
    p.add_argument("--overwrite", action="store_true", help="replace --write-clean / --retrain outputs that exist")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--data-dir", metavar="DIR", help="the data folder, if it moved since training")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_detect_backdoor)


def cmd_detect_backdoor(args) -> int:
    from duboko.io import atomic_write_json
    from duboko.train.run import load_run

    if args.budget is not None and args.budget < 0:
        raise DubokoError(f"--budget must be >= 0, got {args.budget}")
    if not (math.isfinite(args.factor) and args.factor > 0):  # NaN fails every comparison
        raise DubokoError(f"--factor must be a finite number > 0, got {args.factor}")
    if args.out:
        from duboko.evaluate.plots import check_png_output

        check_png_output(args.out)  # before the run is scored, not after
    clean = Path(args.write_clean) if args.write_clean else None
    if args.retrain and clean is None:
        clean = Path(args.retrain).with_name(Path(args.retrain).name + "-exclude.json")
    if clean is not None and clean.exists() and not args.overwrite:
        raise DubokoError(f"{clean} already exists; pass --overwrite to replace it")
    loaded = load_run(args.run, args.device, data_dir=args.data_dir)
    if not hasattr(loaded.task, "detect"):
        raise DubokoError(f"run {args.run!r} is of task {loaded.config.task!r}; detect-backdoor needs a backdoor run "
                          "(recipe mnist-backdoor, task 'backdoor')")
    result = loaded.task.detect(loaded.model, factor=args.factor, budget=args.budget)
    summary = {"run": str(args.run), **result.summary(), "factor": args.factor}
    if args.out:
        from duboko.security.backdoor import plot_detection

        _, labels = loaded.task.splits["train"]
        plot_detection(result, labels.cpu(), args.out, loaded.task.class_names)
        summary["picture"] = str(args.out)
    if clean is not None:
        # rows of the full poisoned split (the exclusion file's numbering), plus any already excluded
        rows = loaded.task.rows[result.flagged].tolist()
        atomic_write_json(clean, {"exclude": sorted(set(rows) | set(loaded.task.excluded.tolist())),
                                  "source": str(args.run), "method": "spectral-signatures"})
        summary["clean_file"] = str(clean)
    if args.json and not args.retrain:
        print(json.dumps(summary))
    else:
        print(f"{args.run}: {summary['poisoned']} poisoned training samples; flagged the top {summary['flagged']} "
              f"spectral-signature scores; {summary['found']} of them poisoned: recall {summary['recall'] * 100:.1f}%, "
              f"precision {summary['precision'] * 100:.1f}%")
        if clean is not None:
            print(f"flagged rows written to {clean} (train without them: --set data.exclude={clean})")
    if args.retrain:
        from duboko import config as C
        from duboko.train.engine import fit

        cfg = C.resolve(Path(args.run), [("data.exclude", str(clean.resolve()))], data_dir=args.data_dir)
        metrics = fit(cfg, Path(args.retrain), overwrite=args.overwrite)
        summary["retrained"] = {k: metrics.get(k) for k in ("test_accuracy", "attack_success_rate", "excluded_samples",
                                                            "poisoned_in_training")}
        if args.json:
            print(json.dumps(summary))
    return 0
