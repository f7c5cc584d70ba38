"""Image-quality metrics for comparing a decoded image to its ground truth, in plain torch.

Each figure answers one question about a super-resolution decode:

| figure | question | better |
|---|---|---|
| `psnr` | how close are the pixel values? | higher |
| `ssim` | is the local structure (luma contrast, edges) the same? | higher, 1 = identical |
| `colour_error` | are the colours of the low-res input kept? (mean CIEDE2000) | lower, < ~1 is invisible |
| `spectral_distance` | is the fine detail as strong as in the truth, or blurred away? | lower, 0 = same |
| `blockiness` | does a block grid show (steps across 8/16-px lines vs elsewhere)? | ~1 = no grid |
| `colour_shift` | does the whole image drift in colour (mean RGB vs the input, in levels)? | lower |
| `seam_score`, `seam_over_grid` | do window borders show (vs elsewhere / vs other cell lines)? | ~1 |

Images are float tensors [B, 3, H, W], RGB, sRGB-encoded, nominally in [0, 1]; values a little
outside are accepted (decoders overshoot) and used as they are. Every function computes in float64
(SSIM's variances and CIEDE2000's hue angles lose digits in float32) and returns float64 tensors
on the input's device. References the tests check against: scikit-image's
`structural_similarity`, `rgb2lab` and `deltaE_ciede2000`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma weights, the Y of YCbCr that SSIM is conventionally reported on.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# SSIM constants of Wang et al. 2004 (data range 1).
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): scipy's truncation, so the window is 11 wide like skimage's
_SSIM_K1, _SSIM_K2 = 0.01, 0.03

# sRGB (D65) -> XYZ and the D65 2-degree white, with the same digits as skimage.color so that
# Lab values agree with it to float precision.
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)

_LOG_FLOOR = 1e-12  # added to the power before log10, so empty (all-zero) spectra stay finite


# --------------------------------------------------------------------------------------------- checks


def _check_images(**images: torch.Tensor) -> None:
    """Raise ValueError unless every tensor is a finite float [B, 3, H, W] and all shapes match."""
    first_name, first_shape = None, None
    for name, x in images.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor [B, 3, H, W], got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"{name} must have shape [B, 3, H, W] (batch, RGB channels first), got {tuple(x.shape)}; "
                "add a batch dimension with x[None] or move channels first with x.permute(0, 3, 1, 2)"
            )
        if min(x.shape) == 0:
            raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(
                f"{name} has dtype {x.dtype}; pass float images in [0, 1] (for uint8: x.float() / 255)"
            )
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf values; fix the decode before measuring it")
        if first_shape is None:
            first_name, first_shape = name, x.shape
        elif x.shape != first_shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but {first_name} has {tuple(first_shape)}; "
                "compare images of the same batch size and resolution"
            )


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of float64 RGB [B, 3, H, W] -> [B, 1, H, W] (on the sRGB-encoded values, as usual)."""
    w = torch.tensor(_LUMA_WEIGHTS, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb * w).sum(dim=1, keepdim=True)


# ----------------------------------------------------------------------------------- PSNR and SSIM


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB, peak 1.0: 10 log10(1 / MSE) over all RGB values.

    pred, target: [B, 3, H, W] in [0, 1]. Returns [B]; +inf for identical images.
    A uniform error of 0.1 gives 20 dB; 1/255 gives 48.1 dB.
    """
    _check_images(pred=pred, target=target)
    mse = (pred.double() - target.double()).square().mean(dim=(1, 2, 3))
    return 10 * torch.log10(1.0 / mse)  # mse == 0 -> inf, which is what identical images deserve


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The normalised 1-D Gaussian of scipy.ndimage.gaussian_filter (sigma 1.5, radius 5) -> [11]."""
    x = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=dtype, device=device)
    g = torch.exp(-0.5 * (x / _SSIM_SIGMA) ** 2)
    return g / g.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) on BT.601 luma, per image.

    pred, target: [B, 3, H, W] in [0, 1], H and W at least 11. Returns [B] in [-1, 1]; 1 = identical.

    Gaussian window 11 x 11 with sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1, population
    (not sample) covariances, valid convolution (no padding), mean over the SSIM map. This is
    `skimage.metrics.structural_similarity(y_true, y_pred, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1.0)`: skimage filters with reflect padding but then
    crops a 5-pixel border before averaging, which leaves exactly the valid positions.
    """
    _check_images(pred=pred, target=target)
    size = 2 * _SSIM_RADIUS + 1
    if pred.shape[2] < size or pred.shape[3] < size:
        raise ValueError(f"ssim needs images of at least {size}x{size} pixels, got {tuple(pred.shape[2:])}")
    x = _luma(pred.double())
    y = _luma(target.double())
    # Filter the five moment images in one grouped, separable convolution.
    moments = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # [B, 5, H, W]
    g = _gaussian_window(moments.dtype, moments.device)
    blurred = F.conv2d(moments, g.view(1, 1, size, 1).expand(5, 1, size, 1), groups=5)
    blurred = F.conv2d(blurred, g.view(1, 1, 1, size).expand(5, 1, 1, size), groups=5)
    mu_x, mu_y, e_xx, e_yy, e_xy = blurred.unbind(dim=1)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    c1, c2 = _SSIM_K1**2, _SSIM_K2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return ssim_map.mean(dim=(1, 2))


# ------------------------------------------------------------------------------- colour: Lab, dE00


def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB [B, 3, H, W] in [0, 1] -> CIELAB [B, 3, H, W] (L in [0, 100], a and b roughly +-128).

    sRGB transfer curve -> linear RGB -> XYZ (D65) -> Lab against the D65 2-degree white, with
    skimage.color.rgb2lab's constants (including its 0.008856 / 7.787 knee), so the two agree to ~1e-10.
    """
    _check_images(rgb=rgb)
    c = rgb.double()
    linear = torch.where(c > 0.04045, ((c + 0.055) / 1.055).clamp_min(0) ** 2.4, c / 12.92)
    m = torch.tensor(_XYZ_FROM_RGB, dtype=c.dtype, device=c.device)
    white = torch.tensor(_D65_WHITE, dtype=c.dtype, device=c.device).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,bjhw->bihw", m, linear) / white
    # Cube root above the knee, the linear segment below it (also keeps negative XYZ real).
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0.008856) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(dim=1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def _polar_2pi(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) -> (chroma, hue in [0, 2 pi))."""
    hue = torch.atan2(b, a)
    return torch.hypot(a, b), torch.where(hue < 0, hue + 2 * math.pi, hue)


def ciede2000(lab1: torch.Tensor, lab2: torch.Tensor) -> torch.Tensor:
    """CIEDE2000 colour difference per pixel (kL = kC = kH = 1).

    lab1, lab2: CIELAB [B, 3, H, W] (e.g. from `srgb_to_lab`). Returns dE00 [B, H, W], >= 0.
    Rough scale: ~1 is a just-noticeable difference side by side, > 5 is an obviously different colour.

    Follows Sharma, Wu & Dalal (2005) in the same arrangement as skimage.color.deltaE_ciede2000
    (including its conventions for achromatic colours, where the hue is undefined), so the two agree
    to float64 rounding.
    """
    _check_images(lab1=lab1, lab2=lab2)
    L1, a1, b1 = lab1.double().unbind(dim=1)
    L2, a2, b2 = lab2.double().unbind(dim=1)
    two_pi = 2 * math.pi

    # Stretch a* by the mean chroma (near-neutral colours get up to 1.5x), then work in L C' h'.
    c_mean = 0.5 * (torch.hypot(a1, b1) + torch.hypot(a2, b2))
    c7 = c_mean**7
    g = 0.5 * (1 - torch.sqrt(c7 / (c7 + 25.0**7)))
    C1, h1 = _polar_2pi(a1 * (1 + g), b1)
    C2, h2 = _polar_2pi(a2 * (1 + g), b2)

    # Lightness term.
    l_mean = 0.5 * (L1 + L2)
    t = (l_mean - 50) ** 2
    l_term = (L2 - L1) / (1 + 0.015 * t / torch.sqrt(20 + t))

    # Chroma term.
    c_mean = 0.5 * (C1 + C2)
    c_term = (C2 - C1) / (1 + 0.045 * c_mean)

    # Hue term: the hue difference goes the short way round the circle; undefined (0) if either
    # colour is achromatic.
    h_diff = h2 - h1
    h_sum = h1 + h2
    cc = C1 * C2
    achromatic = cc == 0
    # (torch.where, not `two_pi * mask`: a bool tensor times a Python float is float32, which would
    # round 2 pi to 7 digits.)
    dh = torch.where(h_diff > math.pi, h_diff - two_pi, h_diff)
    dh = torch.where(h_diff < -math.pi, h_diff + two_pi, dh)
    dh = torch.where(achromatic, torch.zeros_like(dh), dh)
    dh_term = 2 * torch.sqrt(cc) * torch.sin(dh / 2)

    # Mean hue: wrap when the two hues are more than pi apart; for an achromatic colour, the
    # other colour's hue (h_sum, since the achromatic hue is 0).
    wrap = ~achromatic & (h_diff.abs() > math.pi)
    h_mean = torch.where(wrap, torch.where(h_sum < two_pi, h_sum + two_pi, h_sum - two_pi), h_sum)
    h_mean = torch.where(achromatic, 2 * h_mean, h_mean) * 0.5

    tt = (
        1
        - 0.17 * torch.cos(h_mean - math.radians(30))
        + 0.24 * torch.cos(2 * h_mean)
        + 0.32 * torch.cos(3 * h_mean + math.radians(6))
        - 0.20 * torch.cos(4 * h_mean - math.radians(63))
    )
    h_term = dh_term / (1 + 0.015 * c_mean * tt)

    # Rotation term: couples chroma and hue differences in the blue region (~275 degrees).
    c7 = c_mean**7
    rc = 2 * torch.sqrt(c7 / (c7 + 25.0**7))
    dtheta = math.radians(30) * torch.exp(-(((torch.rad2deg(h_mean) - 275) / 25) ** 2))
    r_term = -torch.sin(2 * dtheta) * rc * c_term * h_term

    de2 = l_term**2 + c_term**2 + h_term**2 + r_term
    return torch.sqrt(de2.clamp_min(0))


def colour_error(pred: torch.Tensor, low_res_reference: torch.Tensor, scale: int) -> torch.Tensor:
    """Mean CIEDE2000 between `pred` box-downsampled by `scale` and the low-res reference, per image.

    pred: [B, 3, H, W] in [0, 1]; low_res_reference: [B, 3, H/scale, W/scale] in [0, 1], the image the
    decoder upsamples (e.g. the VAE's own decode of the latent); scale: the integer SR factor.
    Returns [B] in dE00 units (lower is better; below ~1 the colours are indistinguishable).

    This measures colour fidelity to the low-res input, which a super-resolution decoder must
    preserve: it may invent detail, but averaged over each scale x scale block its output should have
    the input's colour. Averaging (F.avg_pool2d, kernel = stride = scale, on the sRGB values) is an
    antialiased area downsample, so detail that averages to zero within a block costs nothing here;
    `spectral_distance` is the figure for detail.
    """
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer (the SR factor), got {scale!r}")
    _check_images(pred=pred)
    _check_images(low_res_reference=low_res_reference)
    b, _, h, w = pred.shape
    if h % scale or w % scale:
        raise ValueError(f"pred size {h}x{w} is not divisible by scale {scale}; crop it to a multiple first")
    expected = (b, 3, h // scale, w // scale)
    if tuple(low_res_reference.shape) != expected:
        raise ValueError(
            f"low_res_reference has shape {tuple(low_res_reference.shape)}, expected {expected} "
            f"(pred {tuple(pred.shape)} downsampled by scale {scale})"
        )
    down = F.avg_pool2d(pred.double(), kernel_size=scale, stride=scale)
    de = ciede2000(srgb_to_lab(down), srgb_to_lab(low_res_reference))
    return de.mean(dim=(1, 2))


# ------------------------------------------------------------------------------------ the spectrum


def spectrum_frequencies(height: int, width: int) -> torch.Tensor:
    """Normalised frequency of each `radial_log_spectrum` bin -> float64 [min(height, width) // 2].

    Bin k (k = 1 .. min(H, W) // 2) holds radius k in units of 1 / min(H, W) cycles per pixel, so its
    normalised frequency is k / (min(H, W) / 2): 1.0 is the Nyquist frequency (0.5 cycles/pixel).
    """
    n = min(height, width)
    return torch.arange(1, n // 2 + 1, dtype=torch.float64) / (n / 2)


def radial_log_spectrum(img: torch.Tensor) -> torch.Tensor:
    """Radially averaged log10 power spectrum of the luma, per image.

    img: [B, 3, H, W] in [0, 1], H and W at least 8. Returns [B, R] with R = min(H, W) // 2:
    log10(power + 1e-12) for radius bins 1 .. R (DC excluded); `spectrum_frequencies(H, W)` gives
    each bin's normalised frequency.

    Luma minus its mean, times a 2-D Hann window (so the image's borders do not add a spurious
    cross of high frequencies), |FFT|^2 divided by the window's energy (so the power is per pixel and
    does not grow with image size). A frequency (fy, fx) in cycles per pixel has radius
    min(H, W) * sqrt(fy^2 + fx^2), rounded to the nearest integer bin: the same cycles-per-pixel
    scale along both axes, so non-square images are binned consistently and equal-size images
    have comparable bins. Frequencies beyond bin R (the corners) are left out.
    """
    _check_images(img=img)
    h, w = img.shape[2:]
    if min(h, w) < 8:
        raise ValueError(f"radial_log_spectrum needs images of at least 8x8 pixels, got {h}x{w}")
    y = _luma(img.double())[:, 0]  # [B, H, W]
    y = y - y.mean(dim=(1, 2), keepdim=True)
    dev = y.device
    window = torch.outer(
        torch.hann_window(h, periodic=False, dtype=y.dtype, device=dev),
        torch.hann_window(w, periodic=False, dtype=y.dtype, device=dev),
    )
    power = torch.fft.fft2(y * window).abs().square() / window.square().sum()  # [B, H, W]

    n = min(h, w)
    bins = n // 2
    fy = torch.fft.fftfreq(h, dtype=y.dtype, device=dev)
    fx = torch.fft.fftfreq(w, dtype=y.dtype, device=dev)
    radius = torch.round(n * torch.hypot(fy[:, None], fx[None, :])).long().flatten()  # [H*W]
    keep = (radius >= 1) & (radius <= bins)
    index = radius[keep] - 1
    flat = power.flatten(1)[:, keep]  # [B, K]
    sums = torch.zeros(flat.shape[0], bins, dtype=y.dtype, device=dev).index_add_(1, index, flat)
    counts = torch.bincount(index, minlength=bins).to(y.dtype)  # every bin is hit: steps are <= 1
    return torch.log10(sums / counts + _LOG_FLOOR)


def spectral_distance(pred: torch.Tensor, target: torch.Tensor, min_frequency: float = 0.25) -> torch.Tensor:
    """High-frequency fidelity: mean |log10 power difference| of the radial spectra, per image.

    pred, target: [B, 3, H, W] in [0, 1]. Returns [B] in log10 units, >= 0; lower is better and 0 means
    the same power at every frequency. Only bins with normalised frequency >= `min_frequency`
    (1.0 = Nyquist) count: by default the upper 3/4 of the spectrum, where a super-resolution
    decoder's invented detail lives.

    Reading the number: 0.3 means the fine-detail power is off by a factor of ~2 on average
    (10^0.3); 1.0 a factor of 10. Blur shows up as a large value (its power falls off steeply with
    frequency), and so does over-sharpening or noise; it says nothing about *where* the detail is
    (a spectrum ignores phase), which is what PSNR and SSIM are for.
    """
    _check_images(pred=pred, target=target)
    if not 0.0 <= min_frequency < 1.0:
        raise ValueError(f"min_frequency must be in [0, 1) (a fraction of Nyquist), got {min_frequency}")
    diff = (radial_log_spectrum(pred) - radial_log_spectrum(target)).abs()
    freqs = spectrum_frequencies(*pred.shape[2:]).to(diff.device)
    return diff[:, freqs >= min_frequency].mean(dim=1)


# ------------------------------------------------------------------------- block grid, colour cast

BLOCK_PERIODS = (8, 16)  # the latent cell and the patch sizes a decoder's grid would follow


def blockiness(img: torch.Tensor, periods: tuple[int, ...] = BLOCK_PERIODS) -> torch.Tensor:
    """How much a block grid shows, per image: the largest, over `periods`, of
    mean |luma step| across the grid lines (every `period` pixels, both axes) / mean |step| elsewhere.

    img: [B, 3, H, W] in [0, 1]. Returns [B]; about 1 for an image without a grid (real photos
    measure a little above 1: JPEG's own 8x8 blocks), above 1 where edges line up with the grid.
    """
    _check_images(img=img)
    steps = _luma_steps(img)
    ratios = []
    for period in periods:
        # step j lies between pixels j and j + 1: on the grid when j + 1 is a multiple of the period
        on = [(torch.arange(s.shape[2], device=s.device) + 1) % period == 0 for s in steps]
        if not any(mask.any() for mask in on):
            raise ValueError(f"images of {tuple(img.shape[2:])} px have no {period}-px grid lines")
        ratios.append(_mean_on(steps, on) / _mean_on(steps, [~m for m in on]).clamp_min(1e-12))
    return torch.stack(ratios).amax(dim=0)


def seam_score(img: torch.Tensor, rows: Sequence[int], cols: Sequence[int]) -> torch.Tensor:
    """How much window borders show, per image: mean |luma step| across the given lines over the mean
    |step| elsewhere (the same ratio as `blockiness`, at a tiled decode's window borders).

    img: [B, 3, H, W] in [0, 1]; rows / cols: pixel positions p where a window starts or ends (the
    step between pixels p - 1 and p), 0 < p < H (W). Returns [B]; about 1 where no seam shows.
    """
    _check_images(img=img)
    if not rows and not cols:
        raise ValueError("seam_score needs at least one window border")
    steps = _luma_steps(img)
    on = _line_masks(steps, rows, cols)
    return _mean_on(steps, on) / _mean_on(steps, [~m for m in on]).clamp_min(1e-12)


def seam_over_grid(img: torch.Tensor, rows: Sequence[int], cols: Sequence[int], grid: int) -> torch.Tensor:
    """How much window borders show beyond the decoder's own grid, per image: mean |luma step| across
    the window borders over the mean across the other lines of the `grid`-px lattice they lie on.

    Tiled windows start on the latent grid, so every border is also a latent-cell (and patch) line;
    a decoder whose cells show raises `seam_score` at every border whether or not it was tiled. Here
    both sides of the ratio are cell lines, so about 1 means a border shows no more than any other
    cell line: what the tiling alone adds. img, rows, cols as in `seam_score`; returns [B].
    """
    _check_images(img=img)
    height, width = img.shape[-2:]
    if not rows and not cols:
        raise ValueError("seam_over_grid needs at least one window border")
    if any(p % grid for p in (*rows, *cols)):
        raise ValueError(f"window borders {list(rows)}, {list(cols)} are not all on the {grid}-px grid")
    other_rows = [p for p in range(grid, height, grid) if p not in set(rows)]
    other_cols = [p for p in range(grid, width, grid) if p not in set(cols)]
    if not other_rows and not other_cols:
        raise ValueError(f"every {grid}-px line of {height}x{width} is a window border: nothing to compare")
    steps = _luma_steps(img)
    borders = _mean_on(steps, _line_masks(steps, rows, cols))
    return borders / _mean_on(steps, _line_masks(steps, other_rows, other_cols)).clamp_min(1e-12)


def _luma_steps(img: torch.Tensor) -> list[torch.Tensor]:
    """|luma step| along rows and along columns, both [B, lines, steps] (step j: pixels j, j + 1)."""
    y = _luma(img.double())[:, 0]
    return [(y[:, :, 1:] - y[:, :, :-1]).abs(), (y[:, 1:, :] - y[:, :-1, :]).abs().transpose(1, 2)]


def _line_masks(steps: list[torch.Tensor], rows: Sequence[int], cols: Sequence[int]) -> list[torch.Tensor]:
    """Per step tensor, which steps cross one of the lines (p: the step between pixels p - 1 and p)."""
    masks = []
    for s, lines in zip(steps, (cols, rows), strict=True):
        mask = torch.zeros(s.shape[2], dtype=torch.bool, device=s.device)
        mask[[p - 1 for p in lines]] = True
        masks.append(mask)
    return masks


def _mean_on(steps: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """[B]: the mean of the masked steps of both axes together."""
    return torch.cat([s[:, :, m].flatten(1) for s, m in zip(steps, masks, strict=True)], 1).mean(1)


def colour_shift(pred: torch.Tensor, low_res_reference: torch.Tensor) -> torch.Tensor:
    """Colour cast per image: max over R, G, B of |mean(pred) - mean(low_res_reference)| in 8-bit levels.

    pred: [B, 3, H, W] in [0, 1], low_res_reference: [B, 3, h, w] in [0, 1] (the decoder's input
    image; any size, only its mean colour counts). Returns [B]; a decoder that keeps the input's
    colours scores under ~3 levels, a visible cast is 10 or more.
    """
    _check_images(pred=pred)
    _check_images(low_res_reference=low_res_reference)
    if pred.shape[0] != low_res_reference.shape[0]:
        raise ValueError(f"pred has {pred.shape[0]} images, low_res_reference {low_res_reference.shape[0]}")
    diff = pred.double().mean(dim=(2, 3)) - low_res_reference.double().mean(dim=(2, 3))
    return 255 * diff.abs().amax(dim=1)


def evaluate(
    pred: torch.Tensor,
    target: torch.Tensor,
    low_res: torch.Tensor,
    scale: int,
    seams: tuple[Sequence[int], Sequence[int]] | None = None,
    grid: int | None = None,
) -> dict[str, float]:
    """All figures, each averaged over the batch (colour_shift_max: the worst image's cast); with
    `seams` (window-border rows, cols of a tiled decode) also "seam" (seam_score), and with the
    latent `grid` (output pixels per cell) too "seam_over_grid".

    pred, target: [B, 3, H, W] in [0, 1]; low_res: [B, 3, H/scale, W/scale] in [0, 1], the decoder's
    input image; scale: the SR factor. Returns {"psnr": dB, "ssim": ..., "colour_error": dE00,
    "spectral_distance": log10 units, "blockiness": ratio, "colour_shift": levels,
    "colour_shift_max": levels}. "psnr" is inf if any image is identical to its target.
    """
    with torch.no_grad():
        shift = colour_shift(pred, low_res)
        return {
            "psnr": psnr(pred, target).mean().item(),
            "ssim": ssim(pred, target).mean().item(),
            "colour_error": colour_error(pred, low_res, scale).mean().item(),
            "spectral_distance": spectral_distance(pred, target).mean().item(),
            "blockiness": blockiness(pred).mean().item(),
            "colour_shift": shift.mean().item(),
            "colour_shift_max": shift.max().item(),
            **({} if seams is None else {"seam": seam_score(pred, *seams).mean().item()}),
            **(
                {}
                if seams is None or grid is None
                else {"seam_over_grid": seam_over_grid(pred, *seams, grid).mean().item()}
            ),
        }
