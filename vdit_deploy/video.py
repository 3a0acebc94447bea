"""Writing sampled videos: .gif, .mp4 (imageio) or .npy (the raw float array), always atomically."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.files import atomic_path

SUFFIXES = (".gif", ".mp4", ".npy")


def check_suffix(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise VditError(f"--out {path}: the suffix must be one of {', '.join(SUFFIXES)}")
    return path


def check_drawable(path: str | Path, channels: int) -> None:
    """Before sampling: a .gif/.mp4 shows 1- or 3-channel videos; a latent-space model's go to .npy."""
    if Path(path).suffix.lower() != ".npy" and channels not in (1, 3):
        raise VditError(f"--out {path}: this model's latents have {channels} channels and its export has no "
                        "decoder.onnx: run `vdit export-decoder PIPELINE/vae --out EXPORT`, or write .npy")


def title_band(titles: list[str], width: int, cell: int, pad: int) -> np.ndarray:
    """(h, width, 3) uint8: each column's title centred over it (Pillow's default font, shrunk to fit)."""
    from PIL import Image, ImageDraw, ImageFont

    size = 11
    fonts = [ImageFont.load_default(size=px) for px in range(size, 5, -1)]
    band = Image.new("RGB", (width, size + 5), "white")
    draw = ImageDraw.Draw(band)
    for i, text in enumerate(titles):
        font = next((f for f in fonts if draw.textlength(text, font=f) <= cell - 2), fonts[-1])
        x = pad + i * (cell + pad) + (cell - draw.textlength(text, font=font)) / 2
        draw.text((max(x, 0), 2), text, fill="black", font=font)
    return np.asarray(band)


def to_frames(videos: np.ndarray, scale: int = 4, columns: int | None = None, pad: int = 1,
              titles: list[str] | None = None) -> np.ndarray:
    """(B, 3, F, H, W) in [-1, 1] -> (F, rows*(H'+pad), cols*(W'+pad), 3) uint8 grid, upscaled; titles:
    one per column, drawn in a band above the grid."""
    b, c, f, h, w = videos.shape
    if c not in (1, 3):
        raise VditError(f"can only draw 1- or 3-channel videos, got {c} channels (write .npy instead)")
    cols = columns or b
    rows = -(-b // cols)
    img = ((np.clip(videos, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    img = np.repeat(np.repeat(img, scale, axis=3), scale, axis=4)                   # (B, C, F, sH, sW)
    if c == 1:
        img = np.repeat(img, 3, axis=1)
    hs, ws = h * scale + pad, w * scale + pad
    grid = np.full((f, rows * hs + pad, cols * ws + pad, 3), 255, np.uint8)
    for i in range(b):
        r, q = divmod(i, cols)
        grid[:, pad + r * hs: pad + r * hs + h * scale, pad + q * ws: pad + q * ws + w * scale] = \
            img[i].transpose(1, 2, 3, 0)
    if titles:
        band = title_band(list(titles), grid.shape[2], w * scale, pad)              # (h, width, 3)
        grid = np.concatenate([np.broadcast_to(band, (f, *band.shape)), grid], axis=1)
    return grid


def write_video(path: str | Path, videos: np.ndarray, fps: int = 6, scale: int = 4,
                columns: int | None = None, titles: list[str] | None = None) -> Path:
    """Write (B, C, F, H, W) videos; several videos become a side-by-side grid (titles: one per column,
    drawn above it in a .gif/.mp4)."""
    import imageio.v3 as iio

    path = check_suffix(path)
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".npy":
            np.save(tmp, videos.astype(np.float32))
        elif suffix == ".gif":
            iio.imwrite(tmp, to_frames(videos, scale, columns, titles=titles), extension=".gif", duration=1000 / fps, loop=0)
        else:
            # H.264 players want sizes in 16-pixel macro blocks: pad the grid's border (no resampling).
            frames = to_frames(videos, scale, columns, titles=titles)
            frames = np.pad(frames, ((0, 0), (0, -frames.shape[1] % 16), (0, -frames.shape[2] % 16), (0, 0)),
                            constant_values=255)
            iio.imwrite(tmp, frames, extension=".mp4", fps=fps, codec="libx264")
    return path
