"""Task "diffusion": train a denoiser on MNIST; sample grids per epoch; sample-quality metrics.

Training (Ho et al. 2020, algorithm 1): for a batch of images x_0 in [-1, 1], draw t ~ U{0..T-1}
and ε ~ N(0, I), form x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε in closed form (`scheduler.add_noise`) and
regress the network's output on ε (or on v) with the mean squared error.

Conditioning comes from the model's `conditioning` field: "none", "class" (the label) or "text"
(a caption made from the label with one of the training phrasings, `duboko.data.captions`). With
probability `p_uncond` the condition is replaced by the null label / empty prompt, so the same
network also learns the unconditional model that classifier-free guidance needs.

At the end of a run (when `grid_rows` > 0) two more pictures go into the run folder: noising.png,
the forward process on a few test images at several t with the run's own schedule, and for a
conditional run guidance_sweep.png, one row per guidance scale of SWEEP_GUIDANCES and one column
per digit (or held-out prompt), the same noise down each column (DDIM, `grid_steps` steps).

The final metrics sample `eval_samples` images and score them with the project's MNIST classifier
(`duboko.evaluate.fid`): `prompt_accuracy` (share classified as the asked-for digit; for text,
prompts use only HELD-OUT phrasings) and `fd_mnist` (Fréchet distance of the classifier's features
to those of 5000 MNIST test images), beside the same numbers for as many real held-out test images
(`fd_mnist_real`, the floor) and for pure noise (`fd_mnist_noise`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from duboko.data import captions as C
from duboko.data import mnist
from duboko.data.batching import batch_slice, epoch_permutation, num_batches, rank_slice
from duboko.diffusion.pipeline import sample
from duboko.diffusion.schedulers import (
    DDPMScheduler,
    SchedulerConfig,
    make_scheduler,
    validate_scheduler_config,
)
from duboko.config import require_at_least
from duboko.errors import DubokoError, unknown_name
from duboko.evaluate.plots import save_grid
from duboko.io import atomic_write_json, read_json
from duboko.seeding import generator
from duboko.tasks import Evaluation, StepOutput, Task, register_task

PROMPT_FILE = "prompt_tokenizer.json"
NOISING_PICTURE = "noising.png"  # the end-of-run noising strip (every diffusion run)
SWEEP_PICTURE = "guidance_sweep.png"  # the end-of-run guidance sweep (conditional runs)
SWEEP_GUIDANCES = (0.0, 1.0, 2.0, 4.0, 6.0, 8.0)  # its rows: classifier-free guidance scales w
NOISING_IMAGES = 4  # test images (rows) of the noising strip
SAMPLERS = ("ddpm", "ddim")
DATASETS = ("mnist",)


@dataclass
class DiffusionDataConfig:
    dataset: str = "mnist"  # the data set (mnist)
    data_dir: str = ""  # folder with the MNIST IDX files ("" searches $DUBOKO_DATA, the bundled copy, the cache)
    limit_train: int = 0  # use only the first N training images (0: all), for quick runs and tests
    val_size: int = 1000  # training images held out (fixed split) for the validation denoising loss
    num_train_timesteps: int = 1000  # T, forward noising steps
    beta_schedule: str = "cosine"  # linear | cosine
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    p_uncond: float = 0.1  # probability of dropping the label/prompt in training (classifier-free guidance)
    # Min-SNR-γ loss weighting (Hang et al. 2023, eq. 9): each timestep's training loss is scaled by
    # min(SNR_t, γ) / SNR_t (ε-prediction) or min(SNR_t, γ) / (SNR_t + 1) (v-prediction), with
    # SNR_t = ᾱ_t / (1 − ᾱ_t); 0: off (plain MSE). The validation loss stays unweighted.
    min_snr_gamma: float = 0.0
    sampler: str = "ddim"  # sampler for grids and metrics: ddim | ddpm
    sample_steps: int = 50  # denoising steps for the metrics' samples
    grid_steps: int = 25  # denoising steps for the per-epoch sample grids
    eta: float = 0.0  # DDIM noise (0: deterministic)
    guidance: float = 3.0  # classifier-free guidance scale for grids and metrics (1: none)
    grid_rows: int = 4  # rows of the per-epoch grid (10 columns: the digits 0-9 when conditioned); 0: no grids, no end pictures
    eval_samples: int = 1000  # samples for prompt_accuracy / fd_mnist at the end (100 per digit; 0: skip the metrics)
    fd_reference: int = 5000  # MNIST test images whose features are the fd_mnist reference
    eval_batch_size: int = 250  # batch size for sampling and validation (bounds the memory of sampling)
    eval_seed: int = 1234  # seed of the metrics' and grids' noise (fixed: epochs are comparable)




@register_task
class DiffusionTask(Task):
    name = "diffusion"
    data_config = DiffusionDataConfig
    shown_metric = ""
    percent_metrics = ("prompt_accuracy", "scorer_accuracy_real")
    datasets = DATASETS
    losses = ("mse",)
    derived_model_fields = {"vocab_size": "the prompt tokenizer's fixed alphabet (model.conditioning = text)"}

    # -- config --------------------------------------------------------------------------------
    @classmethod
    def check(cls, config: Any) -> None:
        super().check(config)
        cfg = config.data
        if cfg.sampler not in SAMPLERS:
            raise unknown_name("data.sampler", cfg.sampler, SAMPLERS)
        if not 0.0 <= cfg.p_uncond < 1.0:
            raise DubokoError(f"data.p_uncond must be in [0, 1), got {cfg.p_uncond}")
        require_at_least("data", cfg, 0, "limit_train", "val_size", "eval_samples", "grid_rows", "eta", "guidance", "min_snr_gamma")
        require_at_least("data", cfg, 1, "sample_steps", "grid_steps", "eval_batch_size")
        cls.scheduler_config_of(cfg)
        # (model.conditioning itself is the model's to check, when it is built.)
        if config.model.get("conditioning", "none") == "text":
            max_len = int(config.model.get("max_prompt_len", 48))
            # The longest training or held-out caption, plus its begin-of-prompt token.
            longest = max(len(C.caption(8, t)) for t in C.TRAIN_TEMPLATES + C.HELD_OUT_TEMPLATES) + 1
            if longest > max_len:
                raise DubokoError(
                    f"model.max_prompt_len {max_len} is shorter than the longest caption ({longest} tokens)"
                )

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, run_dir: Path | None = None) -> None:
        self.schedule = self.scheduler_config()
        self.conditioning = self.config.model.get("conditioning", "none")
        if self.conditioning == "text":
            self.tokenizer = C.PromptTokenizer(int(self.config.model.get("max_prompt_len", 48)))
            if run_dir is not None and (Path(run_dir) / PROMPT_FILE).is_file():
                self.tokenizer = C.PromptTokenizer.from_dict(read_json(Path(run_dir) / PROMPT_FILE))
            self.set_model_field("vocab_size", self.tokenizer.vocab_size)
        else:
            self.tokenizer = None
        self.scheduler = DDPMScheduler(self.schedule)  # add_noise / training targets
        self._data: dict[str, torch.Tensor] | None = None

    @staticmethod
    def scheduler_config_of(data: DiffusionDataConfig) -> SchedulerConfig:
        """The noise schedule a [data] section describes (refused, naming the key, when invalid)."""
        schedule = SchedulerConfig(
            num_train_timesteps=data.num_train_timesteps,
            beta_schedule=data.beta_schedule,
            prediction_type=data.prediction_type,
        )
        validate_scheduler_config(schedule, prefix="data.")
        return schedule

    def scheduler_config(self) -> SchedulerConfig:
        return self.scheduler_config_of(self.config.data)

    def _load(self) -> dict[str, torch.Tensor]:
        """MNIST on the device as uint8 (loaded on first use, so sampling commands skip it)."""
        if self._data is None:
            cfg = self.config.data
            x, y = mnist.load_split("train", cfg.data_dir or None, limit=cfg.limit_train)
            # A fixed split (the same for every run), of at most a fifth of the images; the
            # training images keep the split's permuted order even when none are held out.
            (train_x, train_y), (val_x, val_y) = mnist.hold_out_validation(x, y, min(cfg.val_size, len(x) // 5))
            self._data = {
                "train_x": train_x.to(self.device),  # (N, 28, 28) uint8
                "train_y": train_y.to(self.device),  # (N,) int64
                "val_x": val_x,
                "val_y": val_y,
            }
        return self._data

    def save_assets(self, run_dir: Path) -> list[str]:
        if self.tokenizer is None:
            return []
        atomic_write_json(Path(run_dir) / PROMPT_FILE, self.tokenizer.to_dict())
        return [PROMPT_FILE]

    # -- conditions ----------------------------------------------------------------------------
    def make_condition(self, labels: torch.Tensor, gen: torch.Generator, drop: float, held_out: bool = False) -> torch.Tensor | None:
        """Labels (B,) -> the model's condition: labels or prompt tokens, with a share `drop`
        replaced by the null condition (classifier-free guidance training)."""
        labels = labels.cpu()
        dropped = torch.rand(len(labels), generator=gen) < drop
        if self.conditioning == "class":
            return torch.where(dropped, torch.full_like(labels, self.config.model.get("num_classes", 10)), labels)
        if self.conditioning == "text":
            prompts = C.random_captions(labels, gen, held_out=held_out)
            prompts = ["" if d else p for p, d in zip(prompts, dropped.tolist())]
            return self.tokenizer.batch(prompts)
        return None

    def condition_for(self, labels: list[int] | None = None, prompts: list[str] | None = None) -> torch.Tensor | None:
        """The condition tensor for given labels or prompts (for sampling)."""
        if self.conditioning == "class":
            if prompts:
                raise DubokoError("this run is label-conditioned (model.conditioning = class): give labels, not prompts")
            return torch.tensor(labels, dtype=torch.long) if labels is not None else None
        if self.conditioning == "text":
            if labels is not None and not prompts:
                prompts = [C.caption(int(y), C.HELD_OUT_TEMPLATES[0]) for y in labels]
            return self.tokenizer.batch(prompts) if prompts else None
        if labels is not None or prompts:
            raise DubokoError("this run is unconditional (model.conditioning = none): it takes no label or prompt")
        return None

    # -- training ------------------------------------------------------------------------------
    def num_train_batches(self) -> int:
        return num_batches(len(self._load()["train_x"]), self.config.train.batch_size, self.world_size)

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        data, tcfg = self._load(), self.config.train
        # Drawn on the CPU (as always: a CUDA draw would give other batches), then moved.
        perm = epoch_permutation(len(data["train_x"]), tcfg.seed, epoch).to(self.device)
        T = self.schedule.num_train_timesteps
        r, w = self.rank, self.world_size
        for i in range(start, self.num_train_batches()):
            idx = batch_slice(perm, i, tcfg.batch_size)
            # The global batch's noise, timesteps and conditions come from the batch's own
            # generator (a pure function of seed, epoch, i); each rank then keeps its share.
            g = generator(tcfg.seed, epoch, i)
            x0 = self.train_x0(data, idx, g)  # (B, 1, 28, 28) in [-1, 1] (a latent run: (B, c, h, w))
            noise = torch.randn(x0.shape, generator=g).to(self.device)  # like x0
            t = torch.randint(0, T, (len(idx),), generator=g).to(self.device)  # (B,)
            cond = self.make_condition(data["train_y"][idx], g, self.config.data.p_uncond)  # (B,) | (B, L) | None
            yield {
                "x0": rank_slice(x0, r, w),
                "noise": rank_slice(noise, r, w),
                "t": rank_slice(t, r, w),
                "cond": None if cond is None else rank_slice(cond, r, w).to(self.device),
            }

    def train_x0(self, data: dict[str, torch.Tensor], idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The clean training samples x_0 of a batch: the images, in [-1, 1] (B, 1, 28, 28)."""
        return data["train_x"][idx].float().unsqueeze(1) / 127.5 - 1

    def eval_x0(self, images: torch.Tensor) -> torch.Tensor:
        """Clean samples x_0 of uint8 images (B, 28, 28) for the validation loss."""
        return images.float().unsqueeze(1) / 127.5 - 1

    def sample_options(self) -> dict[str, Any]:
        """Extra keyword arguments of `pipeline.sample` (a latent run changes the output bound)."""
        return {}

    def loss(self, model: nn.Module, batch: dict, reduction: str = "mean", weighted: bool = False) -> torch.Tensor:
        """MSE between the model's output and the scheduler's target; `weighted`: with the
        min-SNR-γ weights of batch["t"] (data.min_snr_gamma > 0), the training loss."""
        xt = self.scheduler.add_noise(batch["x0"], batch["noise"], batch["t"])
        if self.config.train.channels_last:  # faster oneDNN convolutions on CPU (measured 1.3 -> 0.9 s/step)
            xt = xt.contiguous(memory_format=torch.channels_last)
        target = self.scheduler.training_target(batch["x0"], batch["noise"], batch["t"])
        out = model(xt, batch["t"], batch["cond"])
        if not (weighted and self.config.data.min_snr_gamma > 0):
            return F.mse_loss(out.float(), target.float(), reduction=reduction)
        per_sample = F.mse_loss(out.float(), target.float(), reduction="none").flatten(1).mean(1)  # (B,)
        weighted_loss = per_sample * self.min_snr_weights(batch["t"])
        return weighted_loss.mean() if reduction == "mean" else weighted_loss.sum() * out[0].numel()

    def min_snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) min-SNR-γ weights of timesteps t (B,) (Hang et al. 2023, eq. 9; see data.min_snr_gamma)."""
        alpha_bar = self.scheduler.alphas_cumprod.to(t.device)[t].float()  # (B,) ᾱ_t
        snr = alpha_bar / (1.0 - alpha_bar)  # (B,) SNR_t
        clipped = snr.clamp(max=self.config.data.min_snr_gamma)
        return clipped / (snr + 1.0) if self.config.data.prediction_type == "v_prediction" else clipped / snr

    def training_step(self, model: nn.Module, batch: Any) -> StepOutput:
        loss = self.loss(model, batch, weighted=True)
        n = batch["x0"].shape[0]
        return StepOutput(loss, {"loss_sum": loss.detach() * n, "count": float(n)})

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Denoising loss on held-out images with fixed noise, timesteps and conditions."""
        model.eval()
        if split == "test":
            x, y = mnist.load_split("test", self.config.data.data_dir or None)
            x, y = x[: self.config.data.val_size], y[: self.config.data.val_size]
        else:
            data = self._load()
            x, y = data["val_x"], data["val_y"]
        g = generator(self.config.data.eval_seed)  # the same noise every epoch: comparable losses
        total, count = 0.0, 0
        bs = self.config.data.eval_batch_size
        for i in range(0, len(x), bs):
            x0 = self.eval_x0(x[i : i + bs])
            batch = {
                "x0": x0.to(self.device),
                "noise": torch.randn(x0.shape, generator=g).to(self.device),
                "t": torch.randint(0, self.schedule.num_train_timesteps, (len(x0),), generator=g).to(self.device),
                "cond": self.make_condition(y[i : i + bs], g, 0.0),
            }
            if batch["cond"] is not None:
                batch["cond"] = batch["cond"].to(self.device)
            total += float(self.loss(model, batch, reduction="sum")) / x0[0].numel()
            count += len(x0)
        return {"loss": total / max(1, count)}

    # -- sampling ------------------------------------------------------------------------------
    def balanced_labels(self, n: int) -> list[int]:
        return [i % 10 for i in range(n)]

    def generate(
        self,
        model: nn.Module,
        n: int,
        *,
        labels: list[int] | None = None,
        prompts: list[str] | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        eta: float | None = None,
        seed: int | None = None,
        keep_every: int = 0,
        progress=None,
    ):
        """Samples from `model` with this run's schedule; labels/prompts per image (or None)."""
        cfg = self.config.data
        cond = self.condition_for(labels, prompts)
        guidance = cfg.guidance if guidance is None else guidance
        if cond is None:
            guidance = 1.0
        scheduler = make_scheduler(sampler or cfg.sampler, self.schedule)
        return sample(
            model,
            scheduler,
            n,
            cond=cond,
            guidance=guidance,
            num_steps=steps or cfg.sample_steps,
            eta=cfg.eta if eta is None else eta,
            generator=generator(cfg.eval_seed if seed is None else seed),
            device=self.device,
            keep_every=keep_every,
            progress=progress,
            **self.sample_options(),
        )

    def _grid_condition(self, n: int) -> dict:
        labels = self.balanced_labels(n)
        if self.conditioning == "text":  # held-out phrasings, one per row
            prompts = [C.caption(y, C.HELD_OUT_TEMPLATES[(i // 10) % len(C.HELD_OUT_TEMPLATES)]) for i, y in enumerate(labels)]
            return {"prompts": prompts}
        if self.conditioning == "class":
            return {"labels": labels}
        return {}

    def epoch_end(self, model: nn.Module, epoch: int, run_dir: Path | None) -> dict[str, float]:
        cfg = self.config.data
        if cfg.grid_rows <= 0 or run_dir is None:  # the grid is only for the run folder
            return {}
        model.eval()
        n = 10 * cfg.grid_rows
        t0 = time.perf_counter()
        result = self.generate(model, n, steps=cfg.grid_steps, **self._grid_condition(n))
        save_grid(result.images, Path(run_dir) / "samples" / f"epoch_{epoch:03d}.png", nrow=10)
        return {"grid_seconds": time.perf_counter() - t0}

    def generate_batched(self, model: nn.Module, n: int, *, labels: list[int] | None = None,
                         prompts: list[str] | None = None, seed: int | None = None, batch_size: int | None = None,
                         progress=None, **kwargs) -> torch.Tensor:
        """`generate` for many images in batches of `batch_size` (default data.eval_batch_size),
        so that memory stays bounded: images (n, C, H, W) on the CPU. Batch k draws its noise
        with seed + k·batch_size, so a first batch is the same images as `generate(seed=seed)`.
        `progress(done, n)` after each batch."""
        cfg = self.config.data
        bs = batch_size or cfg.eval_batch_size
        base = cfg.eval_seed if seed is None else seed
        images = []
        for i in range(0, n, bs):
            part: dict[str, Any] = {}
            if labels is not None:
                part["labels"] = labels[i : i + bs]
            if prompts is not None:
                part["prompts"] = prompts[i : i + bs]
            result = self.generate(model, min(bs, n - i), seed=base + i, **part, **kwargs)
            images.append(result.images.cpu())
            if progress is not None:
                progress(min(n, i + bs), n)
        return torch.cat(images)

    def _reference(self, n: int) -> tuple[nn.Module, dict[str, Any]]:
        """The scorer and the real-data side of the metrics for n samples (computed once per n:
        `sample --seeds` scores several seeds against the same reference)."""
        from duboko.evaluate import fid

        cache = getattr(self, "_reference_cache", None)
        if cache is not None and cache[0] == n:
            return cache[1], cache[2]
        cfg = self.config.data
        scorer = fid.load_scorer(self.device)
        test_x, test_y = mnist.load_split("test", cfg.data_dir or None)
        n_ref = min(cfg.fd_reference, len(test_x) - n)
        if n_ref < 100:
            raise DubokoError(f"too many samples ({n}) for the 10000 MNIST test images: at most {len(test_x) - 100}")
        ref_feats, _ = fid.score_images(scorer, fid.uint8_to_unit(test_x[:n_ref]))
        real = fid.uint8_to_unit(test_x[-n:])  # disjoint from the reference
        real_feats, real_pred = fid.score_images(scorer, real)
        noise = torch.randn(real.shape, generator=generator(7)).clamp(-1, 1)
        noise_feats, _ = fid.score_images(scorer, noise)
        ref = {
            "ref_feats": ref_feats,
            "fd_real": fid.frechet_distance_features(real_feats, ref_feats),
            "fd_noise": fid.frechet_distance_features(noise_feats, ref_feats),
            "scorer_accuracy_real": float((real_pred == test_y[-n:]).double().mean()),
        }
        self._reference_cache = (n, scorer, ref)
        return scorer, ref

    # -- end-of-run pictures -------------------------------------------------------------------
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion samples x_0 (N, C, H, W) -> images (N, 1, 28, 28) in [-1, 1]: the identity
        here (the samples are the images); a latent run decodes through its VAE."""
        return z

    @torch.no_grad()
    def noising_strip(self, n: int = NOISING_IMAGES) -> list[tuple[int, float, torch.Tensor]]:
        """The forward process of the first n MNIST test images with this run's schedule, at
        `strip_timesteps(T)`: (t, ᾱ_t, images (n, 1, 28, 28) in [-1, 1]) per t. The noise is
        drawn in the space the denoiser works in (pixels, or a latent run's latents, decoded)."""
        from duboko.evaluate.diffusion import noising_frames, strip_timesteps

        cfg = self.config.data
        images, _ = mnist.load_split("test", cfg.data_dir or None, limit=n)  # (n, 28, 28) uint8
        x0 = self.eval_x0(images).cpu()  # (n, C, H, W)
        noise = torch.randn(x0.shape, generator=generator(cfg.eval_seed))
        frames = noising_frames(self.scheduler, x0, noise, strip_timesteps(self.schedule.num_train_timesteps))
        return [(t, abar, self.decode(xt).cpu()) for t, abar, xt in frames]

    def sweep_columns(self) -> tuple[dict[str, Any], list[str]]:
        """The guidance sweep's conditions (the ten digits, or a held-out prompt for each) and
        their column labels."""
        if self.conditioning == "text":
            prompts = [C.caption(y, C.HELD_OUT_TEMPLATES[0]) for y in range(10)]
            return {"prompts": prompts}, [f'"{p}"' for p in prompts]
        if self.conditioning == "class":
            return {"labels": list(range(10))}, [f"digit {y}" for y in range(10)]
        raise DubokoError("this run is unconditional (model.conditioning = none): it has no guidance to sweep")

    @torch.no_grad()
    def guidance_sweep(self, model: nn.Module, guidances: tuple[float, ...] = SWEEP_GUIDANCES) -> tuple[torch.Tensor, list[str]]:
        """Images (G, 10, 1, 28, 28) on the CPU: row g sampled with guidance guidances[g], DDIM
        with `grid_steps` steps and the grids' seed, so every row starts from the same noise
        (column k: the same x_T for every w). Returns the images and the column labels."""
        cond, columns = self.sweep_columns()
        model.eval()
        rows = [self.generate(model, 10, sampler="ddim", steps=self.config.data.grid_steps, guidance=w, **cond).images.cpu()
                for w in guidances]
        return torch.stack(rows), columns

    def write_noising_strip(self, path: Path) -> None:
        from duboko.evaluate.diffusion import plot_noising_strip

        space = "pixels" if type(self).decode is DiffusionTask.decode else "VAE latents, decoded"
        plot_noising_strip(self.noising_strip(), path, row_label="test",
                           title=f"{self.config.recipe}: forward noising x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε "
                                 f"({self.schedule.beta_schedule} schedule, T = {self.schedule.num_train_timesteps}; {space})")

    def write_guidance_sweep(self, model: nn.Module, path: Path) -> None:
        from duboko.evaluate.diffusion import plot_guidance_sweep

        images, columns = self.guidance_sweep(model)
        plot_guidance_sweep(images, list(SWEEP_GUIDANCES), columns, path,
                            title=f"{self.config.recipe}: guidance sweep (DDIM, {self.config.data.grid_steps} steps, "
                                  f"the same noise down each column)")

    def write_end_pictures(self, model: nn.Module, run_dir: Path) -> list[str]:
        """noising.png and, for a conditional run, guidance_sweep.png in the run folder; the
        names written."""
        names = [NOISING_PICTURE]
        self.write_noising_strip(Path(run_dir) / NOISING_PICTURE)
        if self.conditioning != "none":
            self.write_guidance_sweep(model, Path(run_dir) / SWEEP_PICTURE)
            names.append(SWEEP_PICTURE)
        return names

    # -- metrics -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_quality(
        self,
        model: nn.Module,
        n: int,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        eta: float | None = None,
        seed: int | None = None,
        progress=None,
    ) -> dict[str, Any]:
        """prompt_accuracy and fd_mnist for n samples, with the floor and noise values beside."""
        from duboko.evaluate import fid

        from duboko.evaluate.diffusion import accuracy_summary

        cfg = self.config.data
        scorer, ref = self._reference(n)
        cond_kwargs: dict[str, Any] = {}
        labels = self.balanced_labels(n)
        if self.conditioning == "text":
            cond_kwargs["prompts"] = [C.caption(y, C.HELD_OUT_TEMPLATES[i % len(C.HELD_OUT_TEMPLATES)]) for i, y in enumerate(labels)]
        elif self.conditioning == "class":
            cond_kwargs["labels"] = labels
        t0 = time.perf_counter()
        images = self.generate_batched(model, n, sampler=sampler, steps=steps, guidance=guidance, eta=eta, seed=seed,
                                       progress=progress, **cond_kwargs)
        seconds = time.perf_counter() - t0
        feats, preds = fid.score_images(scorer, images)
        out: dict[str, Any] = {
            "fd_mnist": fid.frechet_distance_features(feats, ref["ref_feats"]),
            "fd_mnist_real": ref["fd_real"],
            "fd_mnist_noise": ref["fd_noise"],
            "scorer_accuracy_real": ref["scorer_accuracy_real"],
            "sample_seed": cfg.eval_seed if seed is None else seed,
            "sample_count": n,
            "sample_sampler": sampler or cfg.sampler,
            "sample_steps": steps or cfg.sample_steps,
            "sample_seconds": seconds,
            "sample_seconds_per_image": seconds / n,
        }
        if self.conditioning != "none":
            out.update(accuracy_summary(preds, torch.tensor(labels)))
            out["sample_guidance"] = cfg.guidance if guidance is None else guidance
            if self.conditioning == "text":
                out["prompt_phrasings"] = "held-out"
        out["sample_class_counts"] = torch.bincount(preds, minlength=10).tolist()
        out["_images"] = images
        return out

    def final_metrics(self, model: nn.Module, run_dir: Path | None, history: list[dict]) -> Evaluation:
        cfg = self.config.data
        if run_dir is not None and cfg.grid_rows > 0:  # pictures for the run folder (seconds on a CPU)
            model.eval()
            self.write_end_pictures(model, Path(run_dir))
        if cfg.eval_samples <= 0:
            return Evaluation({})
        model.eval()
        try:
            metrics = self.sample_quality(model, cfg.eval_samples)
        except DubokoError as exc:  # e.g. no scorer weights: keep the run, say why the metrics are missing
            return Evaluation({"sample_quality_error": str(exc)}, f"Sample quality not measured: {exc}\n")
        images = metrics.pop("_images")
        if run_dir is not None:
            save_grid(images[:100], Path(run_dir) / "samples.png", nrow=10)
        report = "Sample quality (" + self.config.recipe + ")\n" + quality_report(metrics)
        return Evaluation(metrics, report)


def quality_report(metrics: dict[str, Any]) -> str:
    """The metrics of `sample_quality` as text lines; prompt_accuracy with its 95 % interval and
    the per-digit accuracies on one line each."""
    lines = []
    for k, v in metrics.items():
        if k in ("prompt_accuracy_low", "prompt_accuracy_high"):
            continue
        if k == "prompt_accuracy" and "prompt_accuracy_low" in metrics:
            lines.append(f"{k} = {v:.4f}  (95 % Wilson interval {metrics['prompt_accuracy_low']:.4f} - "
                         f"{metrics['prompt_accuracy_high']:.4f}, N = {metrics.get('sample_count', '?')})")
        elif k == "prompt_accuracy_per_digit":
            lines.append(f"{k} = " + "  ".join(f"{d}: {a:.2f}" for d, a in enumerate(v)))
        else:
            lines.append(f"{k} = {v:.4f}" if isinstance(v, float) else f"{k} = {v}")
    return "\n".join(lines) + "\n"
