"""CLIP-guided synthesis: an image optimised until its CLIP embedding matches a prompt.

    result = generate(model, tokenizer, "a red circle", config=GenerateConfig(steps=200, seed=0))
    result.image.save("red-circle.png")          # 8-bit RGB; result.losses holds the loss per step

The method, piece by piece:

- **Parameterisation** (Olah et al., 2017, "Feature Visualization", Distill; Lucid's
  ``fft_image`` and ``to_valid_rgb``).  The image is not optimised pixel by pixel but as
  the real and imaginary parts of its 2-D Fourier spectrum, each frequency f scaled by
  1 / max(f, 1/side)^decay, so that every frequency moves at a speed matched to natural
  images' 1/f spectrum and plain gradient steps do not fill the image with high-frequency
  noise.  The inverse FFT gives three decorrelated channels, mixed into RGB by the square
  root of ImageNet's colour correlation matrix (Lucid's ``color_correlation_svd_sqrt``),
  then squashed into [0, 1] by a sigmoid.
- **Cutouts** (Crowson's VQGAN+CLIP notebook and guided-diffusion's ``MakeCutouts``).  Each
  step looks at ``cutouts`` random square crops, of a side drawn uniformly from
  ``cut_scale`` (fractions of the image side) at a random position, resampled to the model's
  input size; each crop gets Gaussian pixel noise and optionally a horizontal flip and a
  brightness/contrast jitter.  An image that satisfies CLIP from many crops and under noise
  is less of an adversarial pattern than one tuned to a single view.  Flips are off by
  default because captions may name positions ("a red star in the top left" becomes false
  when mirrored); jitter is off because it moves colours, which prompts name.
- **Loss**: the mean over cutouts of the squared spherical distance between the normalised
  image embedding x and the normalised text embedding y, 2·arcsin(‖x − y‖/2)² = θ²/2 for
  the angle θ between them (Crowson's ``spherical_dist_loss``), plus ``tv`` times the total
  variation of the image (mean squared difference of neighbouring pixels).
- **Negative prompts** (``negatives``, ``negative_weight``).  Texts the image should *not*
  match add ``negative_weight`` times the cross-entropy of the prompt among the prompt and the
  negatives, with the model's similarities scaled by its logit scale: −log p(prompt | crop)
  under the model's own zero-shot classifier over those texts, averaged over cutouts; for a
  sigmoid-scored model (SigLIP), its own pairwise loss instead: −log σ(s·cos + b) for the prompt
  and −log(1 − σ(s·cos + b)) for each negative, with its learned scale s and bias b.  The
  spherical distance pulls the image towards the prompt; this term pushes it away from the
  nearest wrong texts ("a red hexagon" for "a red circle"), as a classifier's gradient guides
  diffusion sampling towards a class (Dhariwal & Nichol, 2021).  On its own the term is
  satisfied by images the model finds unlike every text, the prompt included, so it is added to
  the spherical distance, not used instead of it.
- **Optimiser**: Adam at ``lr`` on the spectrum.
- **Init image**: the spectrum is set so that the image equals the init image (resized and
  centre-cropped as CLIP's preprocessing does), and ``strength`` ∈ [0, 1] is the fraction of
  the steps then run, as an image-to-image strength skips the first part of a diffusion
  schedule: 0 returns the init image, 1 runs every step from it.

- **Best of N** (``best_of``; DALL·E reranked its samples with CLIP the same way, Ramesh et
  al., 2021).  The whole optimisation is run from ``best_of`` starts, seeded ``seed``,
  ``seed + 1``, …, and the image kept is the one whose 8-bit result the model scores highest
  (the cosine between its embedding, through CLIP's preprocessing, and the prompt's).

Everything random in a start (the starting spectrum, the cutouts, the noise) draws from one
generator seeded with its seed: on the CPU two runs give the same bytes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["FourierImage", "GenerateConfig", "Generated", "generate", "make_cutouts", "spherical_distance"]

# Lucid's color_correlation_svd_sqrt (lucid/optvis/param/color.py): the square root of the
# colour correlation matrix of ImageNet, rows R, G, B; scaled below so its largest column norm is 1.
_COLOUR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=torch.float64)
COLOUR_MIX = (_COLOUR_SQRT / _COLOUR_SQRT.norm(dim=0).max()).float()
_SPECTRUM_SD = 0.01  # Lucid's fft_image starting spectrum
_OUTPUT_DIVISOR = 4.0  # Lucid's fft_image divides the inverse FFT by 4
_PIXEL_EPS = 1e-3  # init pixels are kept inside (0, 1) so that the sigmoid can be inverted


@dataclass(frozen=True)
class GenerateConfig:
    """Settings of `generate`; validated on construction."""

    steps: int = 300  # Adam steps (with an init image: the number at strength 1)
    lr: float = 0.05  # Adam learning rate on the spectrum (Lucid's default for fft_image)
    size: int = 0  # side of the square image in pixels; 0: the model's input size
    cutouts: int = 16  # random crops per step
    cut_scale: tuple[float, float] = (0.6, 1.0)  # range of a crop's side, as a fraction of the image side
    flip: bool = False  # random horizontal flips of the crops (changes "left"/"right" in captions)
    noise: float = 0.03  # std of Gaussian noise added to each crop, pixels in [0, 1]
    jitter: float = 0.0  # brightness/contrast jitter of each crop, ± this much (moves colours)
    tv: float = 0.0  # weight of the total-variation penalty
    decay: float = 1.0  # spectrum scaled by 1 / frequency^decay
    seed: int = 0  # the starting spectrum, the crops and the noise
    strength: float = 1.0  # with an init image: the fraction of the steps run (0 keeps the image)
    frame_every: int = 10  # with frames: save one every this many steps
    best_of: int = 1  # starts (seeds seed, seed + 1, ...); the image the model scores highest is kept
    negatives: tuple[str, ...] = ()  # texts the image should not match (one equal to the prompt is left out)
    negative_weight: float = 0.1  # weight of the cross-entropy of the prompt among the prompt and the negatives

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"generate config: {name} {what}, got {getattr(self, name)!r}")

        for name in ("steps", "size", "seed"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 0, name, "must be a non-negative integer")
        for name in ("cutouts", "frame_every", "best_of"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, name, "must be a positive integer")
        need(self.size == 0 or self.size >= 8, "size", "must be 0 or at least 8 pixels")
        need(self.lr > 0, "lr", "must be positive")
        need(isinstance(self.negatives, tuple) and all(isinstance(t, str) and t.strip() for t in self.negatives),
             "negatives", "must be a tuple of non-empty strings")
        for name in ("noise", "jitter", "tv", "decay", "negative_weight"):
            need(getattr(self, name) >= 0, name, "must be non-negative")
        low, high = self.cut_scale
        need(0 < low <= high <= 1, "cut_scale", "must be (low, high) with 0 < low <= high <= 1")
        need(0 <= self.strength <= 1, "strength", "must be in [0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generated:
    """What `generate` made."""

    image: Image.Image  # the result, 8-bit RGB
    pixels: Tensor  # [3, H, W] in [0, 1], before rounding to 8 bits
    losses: list[float] = field(default_factory=list)  # the loss of each step, before its update
    frames: list[Path] = field(default_factory=list)  # frame files written, in order
    seed: int = 0  # the seed of the start kept
    cosines: list[float] = field(default_factory=list)  # per start: the model's cosine of its image and the prompt

    @property
    def steps(self) -> int:
        """Steps run (strength · steps with an init image): one loss each."""
        return len(self.losses)


# ----------------------------------------------------------------------------- the image


def _frequencies(height: int, width: int) -> Tensor:
    """|f| of each coefficient of ``rfft2`` on a height × width image [height, width // 2 + 1]."""
    fy = torch.fft.fftfreq(height)[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


class FourierImage(nn.Module):
    """An RGB image [1, 3, size, size] in (0, 1), parameterised by a decorrelated, 1/f-scaled
    spectrum (see the module notes); ``FourierImage(64)()`` starts near uniform grey."""

    def __init__(self, size: int, *, decay: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.size = size
        freqs = _frequencies(size, size)
        # Lucid: 1 / max(f, 1/side)^decay; its extra sqrt(h·w) undoes TF's 1/(h·w) irfft, here norm="ortho".
        self.register_buffer("scale", 1.0 / freqs.clamp(min=1.0 / size) ** decay, persistent=False)
        spectrum = torch.randn(3, *freqs.shape, 2, generator=generator) * _SPECTRUM_SD  # real, imaginary
        self.spectrum = nn.Parameter(spectrum)
        self.register_buffer("mix", COLOUR_MIX.clone(), persistent=False)

    def forward(self) -> Tensor:
        coefficients = torch.view_as_complex(self.spectrum) * self.scale  # [3, size, size // 2 + 1]
        channels = torch.fft.irfft2(coefficients, s=(self.size, self.size), norm="ortho") / _OUTPUT_DIVISOR
        rgb = torch.einsum("ij,jhw->ihw", self.mix, channels)  # decorrelated channels → R, G, B
        return torch.sigmoid(rgb)[None]  # [1, 3, size, size]

    @torch.no_grad()
    def set_pixels(self, pixels: Tensor) -> None:
        """Sets the spectrum so that the image is ``pixels`` [3, size, size] (values in [0, 1])."""
        if pixels.shape != (3, self.size, self.size):
            raise ValueError(f"pixels must be [3, {self.size}, {self.size}], got {list(pixels.shape)}")
        logits = torch.logit(pixels.double().clamp(_PIXEL_EPS, 1 - _PIXEL_EPS))
        channels = torch.linalg.solve(self.mix.double(), logits.reshape(3, -1)).reshape(logits.shape)
        coefficients = torch.fft.rfft2(channels * _OUTPUT_DIVISOR, norm="ortho") / self.scale.double()
        self.spectrum.copy_(torch.view_as_real(coefficients).to(self.spectrum))


# ----------------------------------------------------------------------------- the views and the loss


def make_cutouts(
    pixels: Tensor,
    count: int,
    out_size: int,
    *,
    cut_scale: tuple[float, float] = (0.6, 1.0),
    flip: bool = False,
    noise: float = 0.0,
    jitter: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``count`` random square crops of ``pixels`` [1, 3, H, W], resampled bilinearly to
    [count, 3, out_size, out_size], each with its own noise, flip and jitter.

    A crop's side is a fraction of the image side drawn from ``cut_scale``; its position is
    uniform over the places it fits.  Crops are drawn in one batched ``grid_sample``.  Random
    numbers come from ``generator`` on the CPU, so the crops do not depend on the device.
    """
    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator) * (high - low) + low

    side = uniform(cut_scale[0], cut_scale[1], count)  # in units of the image side
    shift = uniform(-1, 1, count, 2) * (1 - side)[:, None]  # centre, in grid_sample's [-1, 1] coordinates
    mirror = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(count)
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0] = side * mirror
    theta[:, 1, 1] = side
    theta[:, :, 2] = shift
    theta = theta.to(pixels)
    grid = F.affine_grid(theta, [count, 3, out_size, out_size], align_corners=False)
    cuts = F.grid_sample(pixels.expand(count, -1, -1, -1), grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)  # [count, 3, out_size, out_size]
    if jitter > 0:
        contrast = uniform(1 - jitter, 1 + jitter, count, 1, 1, 1).to(cuts)
        brightness = uniform(-jitter, jitter, count, 1, 1, 1).to(cuts)
        cuts = (cuts - 0.5) * contrast + 0.5 + brightness
    if noise > 0:
        cuts = cuts + noise * torch.randn(cuts.shape, generator=generator).to(cuts)
    return cuts


def spherical_distance(x: Tensor, y: Tensor) -> Tensor:
    """2·arcsin(‖x̂ − ŷ‖ / 2)² = θ²/2 for unit vectors at angle θ, per row (broadcasting)."""
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    return (x - y).norm(dim=-1).div(2).clamp(max=1).arcsin().pow(2).mul(2)


def total_variation(pixels: Tensor) -> Tensor:
    """Mean squared difference between vertically and horizontally neighbouring pixels."""
    dy = pixels[..., 1:, :] - pixels[..., :-1, :]
    dx = pixels[..., :, 1:] - pixels[..., :, :-1]
    return dy.pow(2).mean() + dx.pow(2).mean()


# ----------------------------------------------------------------------------- the loop


def to_image(pixels: Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] → an 8-bit RGB PIL image (rounded to the nearest level)."""
    array = pixels.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def init_pixels(image: Image.Image, size: int) -> Tensor:
    """An init image as [3, size, size] in [0, 1]: resized and centre-cropped as CLIP's preprocessing does."""
    from clipforge.transforms import image_transform

    return image_transform(size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(image.convert("RGB"))


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No gradient into the model's weights for the duration; their flags restored after."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)


def generate(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    prompt: str,
    *,
    config: GenerateConfig = GenerateConfig(),
    init: Image.Image | None = None,
    frames: str | Path | None = None,
    progress: bool = True,
) -> Generated:
    """An image whose CLIP embedding matches ``prompt`` (the method is in the module notes).

    Args:
        model: a CLIP model with ``encode_image``, ``encode_text`` and ``config.vision`` (input
            size, mean and std); it runs on its own device and its weights are not changed.
        tokenizer: strings → token ids [B, L].
        prompt: the text to match.
        config: steps, learning rate, cutouts, augmentations, regularisation, negative prompts,
            seed and starts.
        init: a starting image; ``config.strength`` is then the fraction of the steps run.
        frames: a folder to write ``frame-NNNNN.png`` into (NNNNN: steps done), at the start,
            every ``config.frame_every`` steps and at the end; with ``best_of`` > 1, one
            subfolder ``seed-S`` per start.
        progress: show a progress bar.
    """
    from clipforge.embed import embed_images
    from clipforge.loss import MAX_SCALE
    from clipforge.transforms import image_transform
    from clipforge.zeroshot import is_sigmoid_model

    vision = model.config.vision  # type: ignore[union-attr]
    device = next(model.parameters()).device
    negatives = [text for text in dict.fromkeys(config.negatives) if text != prompt]
    with torch.no_grad():
        texts = F.normalize(model.encode_text(tokenizer([prompt, *negatives]).to(device)).float(), dim=-1)
        # A model without a learned scale gets a trained CLIP's, which sits at the cap (CLIP section 2.5).
        scale = float(model.logit_scale()) if hasattr(model, "logit_scale") else MAX_SCALE
        bias = float(model.logit_scale.bias) if is_sigmoid_model(model) else None  # SigLIP's learned bias
    target = texts[:1]  # [1, D]
    preprocess = image_transform(vision.image_size, mean=vision.mean, std=vision.std)
    best: Generated | None = None
    cosines: list[float] = []
    for seed in range(config.seed, config.seed + config.best_of):
        folder = Path(frames) if frames is not None else None
        if folder is not None and config.best_of > 1:
            folder = folder / f"seed-{seed}"
        result = _optimise(model, texts, scale, seed, config, init, folder, progress, bias=bias)
        cosines.append(float(embed_images(model, [preprocess(result.image)], progress=False)[0] @ target[0]))
        if best is None or cosines[-1] > max(cosines[:-1]):
            best = result
    assert best is not None
    best.cosines = cosines
    return best


def _prompt_cross_entropy(features: Tensor, texts: Tensor, scale: float) -> Tensor:
    """Mean over rows of features [N, D] of −log softmax(scale · cos(feature, texts))[0]:
    the cross-entropy of text 0 (the prompt) among ``texts`` [T, D] (normalised)."""
    logits = scale * F.normalize(features, dim=-1) @ texts.T  # [N, T]
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def _prompt_sigmoid_loss(features: Tensor, texts: Tensor, scale: float, bias: float) -> Tensor:
    """Mean over rows of features [N, D] of SigLIP's pairwise loss against ``texts`` [T, D]
    (normalised): text 0 (the prompt) a match, the others not; −Σ log σ(±(scale · cos + bias))."""
    logits = scale * F.normalize(features, dim=-1) @ texts.T + bias  # [N, T]
    signs = torch.full_like(logits[:1], -1.0)
    signs[0, 0] = 1.0
    return -F.logsigmoid(signs * logits).sum(dim=1).mean()


def _optimise(model: nn.Module, texts: Tensor, scale: float, seed: int, config: GenerateConfig,
              init: Image.Image | None, folder: Path | None, progress: bool, *, bias: float | None = None
              ) -> Generated:
    """One start of `generate`: the image optimised from ``seed`` towards the prompt, row 0 of
    the normalised text embeddings ``texts`` [1 + negatives, D], and away from the negatives
    (the model's logit scale ``scale``, and its learned ``bias`` for a sigmoid-scored model)."""
    vision = model.config.vision  # type: ignore[union-attr]
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    size = config.size or vision.image_size
    generator = torch.Generator().manual_seed(seed)
    image = FourierImage(size, decay=config.decay, generator=generator).to(device)
    steps = config.steps
    if init is not None:
        image.set_pixels(init_pixels(init, size).to(device))
        steps = round(config.strength * config.steps)
    mean = torch.tensor(vision.mean, device=device)[:, None, None]
    std = torch.tensor(vision.std, device=device)[:, None, None]
    written: list[Path] = []

    def save_frame(done: int, pixels: Tensor) -> None:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            written.append(folder / f"frame-{done:05d}.png")
            to_image(pixels[0]).save(written[-1])

    optimizer = torch.optim.Adam(image.parameters(), lr=config.lr)
    losses: list[float] = []
    with _frozen(model), torch.enable_grad(), tqdm(total=steps, disable=None if progress else True, unit="step") as bar:
        for step in range(steps):
            pixels = image()  # [1, 3, size, size]
            if step % config.frame_every == 0:
                save_frame(step, pixels.detach())
            cuts = make_cutouts(pixels, config.cutouts, vision.image_size, cut_scale=config.cut_scale,
                                flip=config.flip, noise=config.noise, jitter=config.jitter, generator=generator)
            features = model.encode_image(((cuts - mean) / std).to(dtype)).float()  # [cutouts, D]
            loss = spherical_distance(features, texts[:1]).mean()
            if len(texts) > 1 and config.negative_weight > 0:
                push = (_prompt_cross_entropy(features, texts, scale) if bias is None
                        else _prompt_sigmoid_loss(features, texts, scale, bias))
                loss = loss + config.negative_weight * push
            if config.tv > 0:
                loss = loss + config.tv * total_variation(pixels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    with torch.no_grad():
        final = image()
    save_frame(steps, final)
    if not math.isfinite(losses[-1] if losses else 0.0):
        raise FloatingPointError(f"generate: the loss became {losses[-1]}; lower the learning rate")
    return Generated(image=to_image(final[0]), pixels=final[0].cpu(), losses=losses, frames=written, seed=seed)
