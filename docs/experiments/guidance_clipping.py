"""Prompt accuracy of guided DDIM sampling with and without re-deriving eps from the clipped x0
(docs/diffusion.md). Usage: python docs/experiments/guidance_clipping.py RUN_DIR [N]"""
import sys, torch, time
from duboko.train.run import load_run
from duboko.data import captions as C
from duboko.evaluate import fid
from duboko.diffusion.pipeline import sample
from duboko.diffusion.schedulers import make_scheduler
run = sys.argv[1]
r = load_run(run, 'cpu')
task, model = r.task, r.model
scorer = fid.load_scorer()
n = int(sys.argv[2]) if len(sys.argv) > 2 else 100
labels = [i % 10 for i in range(n)]
prompts = [C.caption(y, C.HELD_OUT_TEMPLATES[i % len(C.HELD_OUT_TEMPLATES)]) for i, y in enumerate(labels)]
cond = task.condition_for(None, prompts)
for clipped in (False, True):
    for g in (1.0, 2.0, 4.0):
        t0 = time.time()
        res = sample(model, make_scheduler('ddim', task.schedule), n, cond=cond, guidance=g, num_steps=25,
                     generator=torch.Generator().manual_seed(5), use_clipped_model_output=clipped)
        _, pred = fid.score_images(scorer, res.images)
        acc = float((pred == torch.tensor(labels)).float().mean())
        print(f"clipped={clipped} guidance={g} held-out acc={acc:.3f} std={res.images.std():.3f} ({time.time()-t0:.0f}s)", flush=True)
