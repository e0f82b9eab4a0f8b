"""Write the primer notebooks of this folder (outputs cleared) from the cells below.

    python examples/notebooks/build.py

Each notebook starts with a parameter cell: `DUBOKO_NOTEBOOK_TINY=1` (set by
tests/test_notebooks.py) shrinks every training to seconds; without it the settings take a few
CPU minutes. Runs go under runs/notebooks/ of the working directory. Edit the cells here, not the
.ipynb files: the test checks that the notebooks are what this script writes.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

PARAMETERS = '''\
# Parameters. The test suite sets DUBOKO_NOTEBOOK_TINY=1: tiny data and a few steps, seconds on a CPU.
import os
from importlib.util import find_spec
from pathlib import Path

TINY = os.environ.get("DUBOKO_NOTEBOOK_TINY") == "1"
RUNS = Path("runs/notebooks")
# A notebook progress bar needs ipywidgets (tqdm's notebook mode); without it, per-epoch lines only.
PROGRESS = (not TINY) and find_spec("ipywidgets") is not None

import torch
import duboko
from IPython.display import Image, display

torch.manual_seed(0)
if TINY:
    torch.set_num_threads(1)
'''

CORPUS = '''\
# The bundled Shakespeare; the tiny settings train on its first 20,000 characters.
from duboko.data.text import default_corpus_path

text = default_corpus_path().read_text(encoding="utf-8")
corpus = RUNS / "corpus.txt"
corpus.parent.mkdir(parents=True, exist_ok=True)
corpus.write_text(text[:20_000] if TINY else text, encoding="utf-8")
'''


def code(source: str):
    return new_code_cell(source.strip("\n"))


def md(source: str):
    return new_markdown_cell(source.strip("\n"))


NOTEBOOKS: dict[str, list] = {}

NOTEBOOKS["01_mlp_and_activations.ipynb"] = [
    md("""
# 1. An MLP and its activations

The primer's first chapter: activation functions and their derivatives, then a multi-layer
perceptron on MNIST, trained with `duboko.train` (the same engine as `duboko train`).
"""),
    code(PARAMETERS),
    md("""
## Activations and their derivatives

`duboko.nn.activations` writes each function and its derivative by hand; autograd checks them.
"""),
    code('''
from duboko.evaluate.plots import figure
from duboko.nn import activations as A

x = torch.linspace(-4, 4, 401, dtype=torch.float64)  # (401,)
with figure("activations.png", 1, 2, size=(10, 3.6), title="Activations and their derivatives") as (fig, axes):
    for name in A.HIDDEN_ACTIVATIONS:
        act = A.get(name)
        axes[0][0].plot(x, act.fn(x), label=name)
        axes[0][1].plot(x, act.derivative(x), label=name)
    axes[0][0].legend(fontsize=8)
    axes[0][0].set_title("f(x)")
    axes[0][1].set_title("f'(x)")
display(Image("activations.png"))

for name in A.HIDDEN_ACTIVATIONS:
    act = A.get(name)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(act.fn(xg).sum(), xg)
    error = (grad - act.derivative(x)).abs().max().item()
    print(f"{name:<11} max |hand-written - autograd| = {error:.1e}")
    assert error < 1e-6, name
'''),
    md("""
## The MLP: 784 → 512 → 256 → 10

Parameters of a linear layer: (inputs + 1 bias) · outputs.
"""),
    code('''
summary = duboko.summary("mlp-mnist")
print(summary)
assert summary.total_params == (784 + 1) * 512 + (512 + 1) * 256 + (256 + 1) * 10
'''),
    code('''
tiny = {"data.limit_train": 512, "data.limit_test": 200, "train.epochs": 1, "model.hidden_sizes": [32],
        "train.num_threads": 1}
run = duboko.train("mnist-mlp", out=RUNS / "mlp", overwrite=True, verbose=not TINY, progress=PROGRESS,
                   overrides=tiny if TINY else {"train.epochs": 2})
run  # metrics and the training curves
'''),
    code('''
print(f"test accuracy {run.metrics['test_accuracy']:.2%}")
run.history
'''),
    code('''
# Predict MNIST test digits given as numpy arrays (paths and PIL images work the same way).
from duboko.data.mnist import load_split

images, labels = load_split("test", None, limit=5)  # (5, 28, 28) uint8
for result, label in zip(run.predict([img.numpy() for img in images]), labels.tolist()):
    best = next(iter(result["probabilities"].values()))
    print(f"label {label}: predicted {result['class']} ({best:.1%})")
'''),
]

NOTEBOOKS["02_my_net_parameters.ipynb"] = [
    md("""
# 2. MY_NET and its parameter arithmetic

The primer's CNN: three 3×3 convolutions, two 2×2 max-pools and two linear layers, on 48×48 RGB
inputs. Every parameter count follows from the shapes.
"""),
    code(PARAMETERS),
    code('''
summary = duboko.summary("my_net", input_shape=(3, 48, 48))
summary
'''),
    md("""
A 3×3 convolution from C_in to C_out channels has (3·3·C_in + 1)·C_out parameters; two
2×2 pools take 48×48 down to 12×12, so fc1 sees 128·12·12 = 18,432 features.
"""),
    code('''
by_hand = {
    "conv1": (3 * 3 * 3 + 1) * 32,
    "conv2": (3 * 3 * 32 + 1) * 64,
    "conv3": (3 * 3 * 64 + 1) * 128,
    "fc1": (128 * 12 * 12 + 1) * 512,
    "fc2": (512 + 1) * 10,
}
rows = {row.name: row.params for row in summary.rows}
for layer, count in by_hand.items():
    print(f"{layer:<6} {count:>12,}  {'ok' if rows[layer] == count else 'MISMATCH'}")
    assert rows[layer] == count
assert summary.total_params == sum(by_hand.values())
print(f"total  {summary.total_params:>12,}")
'''),
    code('''
# The same model as a plain nn.Module for your own loop.
net = duboko.create_model("my_net", num_classes=10)
logits = net(torch.randn(2, 3, 48, 48))  # (2, 10)
logits.shape
'''),
    md("""
## Training MY_NET on MNIST

The tiny settings use 16×16 inputs (fc1 then sees 128·4·4 features) and 512 images.
"""),
    code('''
tiny = {"data.image_size": 16, "model.image_size": 16, "data.limit_train": 512, "data.limit_test": 200,
        "data.eval_batch_size": 200, "train.epochs": 1, "train.num_threads": 1}
run = duboko.train("mnist-cnn", out=RUNS / "cnn", overwrite=True, verbose=not TINY, progress=PROGRESS,
                   overrides=tiny if TINY else {"train.epochs": 1})
run
'''),
    code('''
metrics = run.evaluate()  # what `duboko eval --json` prints
print(f"test accuracy {metrics['test_accuracy']:.2%}, test loss {metrics['test_loss']:.3f}")
'''),
]

NOTEBOOKS["03_lstm_vs_rnn_gradient_flow.ipynb"] = [
    md("""
# 3. LSTM vs RNN: how far back does the gradient reach?

For a character model, the norm of ∂(loss at the last step)/∂(input at step T-1-k) as the
distance k grows. A plain tanh RNN's gradient falls off geometrically (vanishing gradients); the
LSTM's additive cell state carries it much further (Hochreiter & Schmidhuber 1997).
"""),
    code(PARAMETERS),
    code(CORPUS),
    code('''
tiny = {"data.path": str(corpus), "model.hidden_size": 32, "model.embedding_dim": 16, "data.seq_len": 32,
        "train.batch_size": 16, "train.max_steps": 15, "train.epochs": 1, "train.warmup_steps": 0,
        "data.sample_tokens": 20, "train.num_threads": 1}
full = {"data.path": str(corpus), "train.max_steps": 300}
runs = {}
for recipe in ("shakespeare-rnn", "shakespeare-lstm"):
    runs[recipe] = duboko.train(recipe, out=RUNS / recipe, overwrite=True, verbose=not TINY, progress=PROGRESS,
                                overrides=tiny if TINY else full)
    print(recipe, f"val_bpc {runs[recipe].metrics.get('val_bpc', float('nan')):.3f}")
'''),
    code('''
from duboko.evaluate.gradflow import gradient_by_distance, plot_gradient_flow

steps = 40 if TINY else 200
curves = {}
for recipe, run in runs.items():
    ids = torch.tensor(run.task.tokenizer.encode(corpus.read_text(encoding="utf-8")[-5_000:]))  # (N,) the end: validation text
    curves[recipe] = gradient_by_distance(run.model, ids, steps, batch=8, seed=0)  # index k = distance
    first, last = curves[recipe][0], curves[recipe][-1]
    print(f"{recipe:<17} |dL/dx| at k=0: {first:.2e}   at k={steps - 1}: {last:.2e}   ratio {last / first:.1e}")
plot_gradient_flow(curves, "gradflow.png")
display(Image("gradflow.png"))
'''),
    code('''
print(runs["shakespeare-lstm"].generate("ROMEO:", max_new_tokens=60, seed=0))
'''),
]

NOTEBOOKS["04_attention_from_parts.ipynb"] = [
    md("""
# 4. Attention from its parts

Scaled dot-product attention (Vaswani et al. 2017): softmax(QKᵀ/√d)·V, with a causal mask for a
language model. Built by hand, checked against duboko's block and PyTorch's fused kernel, then a
tiny GPT trained and sampled through the API.
"""),
    code(PARAMETERS),
    code('''
import math
import torch.nn.functional as F
from duboko.nn.attention import attention, causal_mask

B, H, T, d = 2, 2, 6, 8
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, H, T, d, generator=g) for _ in range(3))  # (B, H, T, d)
scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (B, H, T, T)
mask = causal_mask(T)  # (T, T) True where a query may look
weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)  # rows sum to 1
by_hand = weights @ v  # (B, H, T, d)
print("max difference to duboko:", (by_hand - attention(q, k, v, is_causal=True)).abs().max().item())
print("max difference to PyTorch:", (by_hand - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max().item())
assert torch.allclose(by_hand, attention(q, k, v, is_causal=True), atol=1e-5)
'''),
    code('''
from duboko.evaluate.plots import figure

with figure("attention_weights.png", size=(4, 3.6), title="Causal attention weights (batch 0, head 0)") as (fig, axes):
    im = axes[0][0].imshow(weights[0, 0], cmap="viridis")
    axes[0][0].set_xlabel("key position")
    axes[0][0].set_ylabel("query position")
    fig.colorbar(im)
display(Image("attention_weights.png"))
'''),
    code(CORPUS),
    code('''
tiny = {"data.path": str(corpus), "model.n_embd": 32, "model.n_head": 2, "model.n_layer": 1, "data.seq_len": 32,
        "train.batch_size": 16, "train.max_steps": 15, "train.epochs": 1, "train.warmup_steps": 0,
        "data.sample_tokens": 20, "train.num_threads": 1}
gpt = duboko.train("shakespeare-gpt", out=RUNS / "gpt", overwrite=True, verbose=not TINY, progress=PROGRESS,
                   overrides=tiny if TINY else {"train.max_steps": 300})
print(duboko.summary(gpt.model, forward=False))
'''),
    code('''
# Streamed: each piece is printed as soon as it is sampled.
for piece in gpt.stream("ROMEO:", max_new_tokens=80, temperature=0.8, seed=1):
    print(piece, end="")
print()
assert gpt.generate("ROMEO:", max_new_tokens=80, temperature=0.8, seed=1) == "".join(
    gpt.stream("ROMEO:", max_new_tokens=80, temperature=0.8, seed=1))
'''),
]

NOTEBOOKS["05_diffusion_noising_and_sampling.ipynb"] = [
    md("""
# 5. Diffusion: noising and sampling

The forward process noises an image in closed form, x_t = √ᾱ_t·x₀ + √(1-ᾱ_t)·ε (Ho et al. 2020);
a U-Net learns to predict ε, and the sampler walks back from pure noise (DDIM, Song et al. 2021),
here with classifier-free guidance on the digit label (Ho & Salimans 2022).
"""),
    code(PARAMETERS),
    code('''
from duboko.data.mnist import load_split
from duboko.evaluate.diffusion import plot_noising

images, labels = load_split("test", None, limit=1)
plot_noising(images[0], "noising.png", [0, 100, 250, 500, 750, 1000], ["linear", "cosine"], seed=0,
             title=f"Forward process on a {int(labels[0])}")
display(Image("noising.png"))
'''),
    code('''
# The closed form against the scheduler's add_noise.
from duboko.diffusion.schedulers import DDPMScheduler

sched = DDPMScheduler(beta_schedule="cosine")
x0 = images[:1, None].float() / 127.5 - 1  # (1, 1, 28, 28) in [-1, 1]
eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
t = 499
abar = sched.alphas_cumprod[t]
closed = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
assert torch.allclose(closed, sched.add_noise(x0, eps, torch.tensor([t])), atol=1e-5)
print(f"t = {t + 1}: ᾱ = {float(abar):.3f}; signal weight {float(abar.sqrt()):.3f}, noise weight {float((1 - abar).sqrt()):.3f}")
'''),
    code('''
tiny = {"model.base_channels": 8, "model.channel_mults": [1, 2], "model.groups": 4, "model.num_heads": 2,
        "model.attention_resolutions": [7], "data.limit_train": 128, "data.val_size": 32, "data.eval_samples": 0,
        "data.grid_rows": 1, "data.grid_steps": 2, "data.eval_batch_size": 32, "train.epochs": 1,
        "train.batch_size": 32, "train.warmup_steps": 0, "train.ema_decay": 0, "train.num_threads": 1}
run = duboko.train("mnist-diffusion-class", out=RUNS / "diffusion", overwrite=True, verbose=not TINY,
                   progress=PROGRESS, overrides=tiny if TINY else {"train.epochs": 1, "data.eval_samples": 0})
run
'''),
    code('''
from duboko.evaluate.plots import save_grid

sevens = run.sample(7, n=8, guidance=3.0, steps=4 if TINY else 50, seed=0)  # (8, 1, 28, 28) in [0, 1]
print(sevens.shape, float(sevens.min()), float(sevens.max()))
save_grid(sevens * 2 - 1, "sevens.png", nrow=8)  # save_grid takes [-1, 1]
display(Image("sevens.png"))
'''),
]


def build() -> dict[str, nbformat.NotebookNode]:
    books = {}
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells, metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        })
        # Stable cell ids, so that rebuilding changes nothing when the cells did not change.
        for i, cell in enumerate(nb.cells):
            cell["id"] = f"cell-{i:02d}"
        nbformat.validate(nb)
        books[name] = nb
    return books


def main() -> None:
    for name, nb in build().items():
        nbformat.write(nb, HERE / name)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
