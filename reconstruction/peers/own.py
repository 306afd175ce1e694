"""The three Table 1 peers anomalib lacks, written from their papers as small modules ("own implementation").

- **UAE** (Mao et al. 2020, ref [18]): a convolutional autoencoder with a dense bottleneck that predicts,
  per pixel, a reconstruction ``mu`` and a log-variance ``log s2``; trained with the heteroscedastic loss
  ``(x - mu)^2 / s2 + log s2``. Map = the uncertainty-normalised error ``(x - mu)^2 / s2``; score = its mean.
- **InTrans** (Pirnay & Chai 2022, ref [21]): the image is cut into a grid of square patches; a transformer
  sees the ``window x window`` patches around a target patch (target replaced by a learned mask token, local
  and global position embeddings) and inpaints the target's pixels. At test time every patch is inpainted from
  its neighbourhood (the window slides inwards at the borders). Map = MSGMSD between image and inpainting;
  score = maximum of the map.
- **FAIR** (Liu et al. 2023, ref [15]): frequency-aware restoration. The input is the image's high-frequency
  component (Gaussian high-pass in the 2D Fourier domain); a U-Net restores the full image from it.
  Map = MSGMSD between image and restoration; score = maximum of the map.

The sizes are CPU-scale (see ``docs/design.md``); the papers' widths are reachable through the options.

>>> from reconstruction.peers.base import PEERS
>>> [PEERS[n].source for n in ("uae", "intrans", "fair")]
['own implementation', 'own implementation', 'own implementation']
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from reconstruction.deviation import anomaly_map
from reconstruction.losses import LossWeights, reconstruction_loss
from reconstruction.peers.base import Budget, Peer, fit_steps, mean_loss, register_peer, to_batch
from reconstruction.unet import UNet, UNetConfig
from scans.records import ScanArrays


def _smooth_max(maps: Tensor, k: int) -> Tensor:
    """Maximum of the ``k x k`` mean-filtered map (robust to single-pixel noise)."""
    return F.avg_pool2d(maps, k, 1, k // 2, count_include_pad=False).amax(dim=(-3, -2, -1))


def _msgmsd(x: Tensor, rec: Tensor) -> tuple[Tensor, Tensor]:
    """Score (3 x 3 smoothed maximum) and ``[B, S, S]`` map of MSGMSD between ``x`` and its reconstruction."""
    maps = anomaly_map("msgmsd", x, rec)
    return _smooth_max(maps, 3), maps[:, 0]


# ---- UAE -------------------------------------------------------------------------------------------
def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UncertaintyAE(nn.Module):
    """Four stride-2 conv stages, a dense latent, a mirrored decoder with two heads (mean, log-variance)."""

    def __init__(self, size: int, width: int = 16, latent: int = 16) -> None:
        super().__init__()
        ch = [width, width * 2, width * 4, width * 4]
        self.side = size // 16
        self.ch = ch[-1]
        self.encoder = nn.Sequential(_down(1, ch[0]), _down(ch[0], ch[1]), _down(ch[1], ch[2]), _down(ch[2], ch[3]))
        flat = ch[3] * self.side * self.side
        self.to_latent = nn.Linear(flat, latent)
        self.from_latent = nn.Sequential(nn.Linear(latent, flat), nn.ReLU(inplace=True))
        self.decoder = nn.Sequential(_up(ch[3], ch[2]), _up(ch[2], ch[1]), _up(ch[1], ch[0]), _up(ch[0], ch[0]))
        self.mean = nn.Conv2d(ch[0], 1, 3, 1, 1)
        self.logvar = nn.Conv2d(ch[0], 1, 3, 1, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.to_latent(self.encoder(x).flatten(1))
        h = self.decoder(self.from_latent(z).view(-1, self.ch, self.side, self.side))
        return self.mean(h), self.logvar(h).clamp(-10.0, 10.0)


def uae_loss(x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Heteroscedastic reconstruction loss ``mean((x - mu)^2 exp(-logvar) + logvar)``."""
    return ((x - mu) ** 2 * torch.exp(-logvar) + logvar).mean()


@register_peer("uae", display="UAE", source="own implementation", pretrained=False, reference="Mao et al. 2020 [18]")
class UaePeer(Peer):
    """Autoencoder with per-pixel uncertainty; map = error normalised by the predicted variance."""

    defaults = {"width": 16, "latent": 16, "lr": 1e-3}
    budgets = {
        "quick": Budget(epochs=2, batch_size=8),
        "default": Budget(epochs=50, batch_size=16, work_size=128),
        "paper": Budget(epochs=250, batch_size=64),
    }

    def _build(self, size: int) -> nn.Module:
        return UncertaintyAE(size, int(self.options["width"]), int(self.options["latent"]))

    def _fit(self, train: ScanArrays, val: ScanArrays | None, budget: Budget, rng: np.random.Generator) -> dict:
        net = self.net
        assert isinstance(net, UncertaintyAE)
        opt = torch.optim.Adam(net.parameters(), lr=float(self.options["lr"]))
        images = np.asarray(train.images, np.float32)

        def loss_of(idx: np.ndarray) -> Tensor:
            x = to_batch(images, idx, self.device) * 2 - 1
            return uae_loss(x, *net(x))

        rec = fit_steps(net, opt, len(images), budget, rng, loss_of)
        net.eval()
        val_loss = (
            mean_loss(lambda b: uae_loss(b * 2 - 1, *net(b * 2 - 1)), np.asarray(val.images, np.float32), self.device)
            if val is not None and len(val)
            else None
        )
        return {**rec, "val_loss": val_loss}

    def _predict(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x = x * 2 - 1
        mu, logvar = self.net(x)  # type: ignore[misc]
        maps = ((x - mu) ** 2 * torch.exp(-logvar))[:, 0]
        return maps.mean(dim=(-2, -1)), maps


# ---- InTrans ---------------------------------------------------------------------------------------
class InpaintingTransformer(nn.Module):
    """Transformer that inpaints the target patch of a ``window x window`` patch neighbourhood."""

    win_idx: Tensor
    tgt_local: Tensor

    def __init__(self, grid: int, patch: int, window: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        if window > grid or window % 2 == 0:
            raise ValueError(f"InTrans window must be odd and at most the grid ({grid}), got {window}")
        self.grid, self.patch, self.window = grid, patch, window
        self.embed = nn.Linear(patch * patch, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.local_pos = nn.Parameter(torch.randn(window * window, dim) * 0.02)
        self.global_pos = nn.Parameter(torch.randn(grid * grid, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch * patch)
        win_idx, tgt_local = self._windows()
        self.register_buffer("win_idx", win_idx, persistent=False)
        self.register_buffer("tgt_local", tgt_local, persistent=False)

    def _windows(self) -> tuple[Tensor, Tensor]:
        """For every target patch: the grid indices of its window and the target's position in the window."""
        g, w = self.grid, self.window
        idx, loc = [], []
        for i in range(g):
            for j in range(g):
                r0, c0 = min(max(i - w // 2, 0), g - w), min(max(j - w // 2, 0), g - w)
                rows = torch.arange(r0, r0 + w).view(-1, 1)
                cols = torch.arange(c0, c0 + w).view(1, -1)
                idx.append((rows * g + cols).reshape(-1))
                loc.append((i - r0) * w + (j - c0))
        return torch.stack(idx), torch.tensor(loc)

    def patches(self, x: Tensor) -> Tensor:
        """``[B, 1, S, S]`` -> ``[B, grid*grid, patch*patch]``."""
        return F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)

    def inpaint(self, patches: Tensor, targets: Tensor) -> Tensor:
        """Inpaint target patch indices ``targets`` ``[B, T]`` of ``patches`` -> ``[B, T, patch*patch]``."""
        b, t = targets.shape
        win = self.win_idx[targets]  # [B, T, L]
        tokens = torch.gather(
            patches.unsqueeze(1).expand(-1, t, -1, -1),
            2,
            win.unsqueeze(-1).expand(-1, -1, -1, patches.shape[-1]),
        )
        loc = self.tgt_local[targets]  # [B, T]
        is_target = F.one_hot(loc, self.window * self.window).bool().unsqueeze(-1)
        h = torch.where(is_target, self.mask_token, self.embed(tokens)) + self.local_pos + self.global_pos[win]
        h = self.encoder(h.reshape(b * t, -1, h.shape[-1]))
        out = h[torch.arange(b * t), loc.reshape(-1)]
        return self.head(self.norm(out)).view(b, t, -1)

    def forward(self, x: Tensor) -> Tensor:
        """Every patch inpainted from its neighbourhood: ``[B, 1, S, S]`` -> ``[B, 1, S, S]``."""
        p = self.patches(x)
        targets = torch.arange(self.grid * self.grid, device=x.device).expand(x.shape[0], -1)
        rec = self.inpaint(p, targets)
        return F.fold(rec.transpose(1, 2), x.shape[-2:], self.patch, stride=self.patch)


@register_peer(
    "intrans", display="InTrans", source="own implementation", pretrained=False, reference="Pirnay & Chai 2022 [21]"
)
class InTransPeer(Peer):
    """Patch-inpainting transformer on a ``grid x grid`` patch grid (paper: 16 px patches, 7 x 7 windows)."""

    deterministic_kernels = True  # the gathered-token backward accumulates in a thread-dependent order otherwise

    defaults = {"grid": 16, "window": 7, "dim": 64, "depth": 4, "heads": 4, "targets": 16, "lr": 1e-4}
    budgets = {
        "quick": Budget(epochs=2, batch_size=8),
        "default": Budget(epochs=60, batch_size=16, work_size=128),
        "paper": Budget(epochs=300, batch_size=256),
    }

    def _build(self, size: int) -> nn.Module:
        o = self.options
        grid = int(o["grid"])
        if size % grid:
            raise ValueError(f"intrans: image side {size} must be a multiple of the grid {grid}")
        return InpaintingTransformer(
            grid, size // grid, int(o["window"]), int(o["dim"]), int(o["depth"]), int(o["heads"])
        )

    def _fit(self, train: ScanArrays, val: ScanArrays | None, budget: Budget, rng: np.random.Generator) -> dict:
        net = self.net
        assert isinstance(net, InpaintingTransformer)
        opt = torch.optim.Adam(net.parameters(), lr=float(self.options["lr"]))
        images = np.asarray(train.images, np.float32)
        n_cells, n_t = net.grid * net.grid, int(self.options["targets"])

        def loss_of(idx: np.ndarray) -> Tensor:
            p = net.patches(to_batch(images, idx, self.device) * 2 - 1)
            targets = torch.from_numpy(rng.integers(0, n_cells, size=(len(idx), n_t))).to(self.device)
            truth = torch.gather(p, 1, targets.unsqueeze(-1).expand(-1, -1, p.shape[-1]))
            return F.mse_loss(net.inpaint(p, targets), truth)

        return fit_steps(net, opt, len(images), budget, rng, loss_of)

    def _predict(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x = x * 2 - 1
        return _msgmsd(x, self.net(x).clamp(-1, 1))  # type: ignore[misc]


# ---- FAIR ------------------------------------------------------------------------------------------
def high_pass(x: Tensor, cutoff: float) -> Tensor:
    """High-frequency component of ``[B, 1, S, S]`` images: Gaussian high-pass ``1 - exp(-d^2 / 2 d0^2)``.

    ``cutoff`` is ``d0`` as a fraction of the Nyquist radius. The output is scaled by its per-image std.

    >>> float(high_pass(torch.ones(1, 1, 16, 16), 0.1).abs().max()) < 1e-4
    True
    """
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h, device=x.device).view(-1, 1)
    fx = torch.fft.fftfreq(w, device=x.device).view(1, -1)
    d2 = (fy**2 + fx**2) / 0.25  # squared radius in units of the Nyquist frequency
    filt = 1 - torch.exp(-d2 / (2 * cutoff**2))
    hf = torch.fft.ifft2(torch.fft.fft2(x) * filt).real
    return hf / (hf.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-3)


@register_peer("fair", display="FAIR", source="own implementation", pretrained=False, reference="Liu et al. 2023 [15]")
class FairPeer(Peer):
    """U-Net restoring the image from its high-frequency component; map = MSGMSD(image, restoration)."""

    defaults = {"base": 16, "depth": 4, "cutoff": 0.1, "lr": 1e-3}
    budgets = {
        "quick": Budget(epochs=2, batch_size=8),
        "default": Budget(epochs=25, batch_size=8, work_size=128),
        "paper": Budget(epochs=500, batch_size=16),
    }

    def _build(self, size: int) -> nn.Module:
        depth = int(self.options["depth"])
        if size % (2**depth):
            raise ValueError(f"fair: image side {size} must be a multiple of {2**depth}")
        return UNet(UNetConfig(base=int(self.options["base"]), depth=depth, max_mult=8))

    def _fit(self, train: ScanArrays, val: ScanArrays | None, budget: Budget, rng: np.random.Generator) -> dict:
        net = self.net
        assert isinstance(net, UNet)
        opt = torch.optim.Adam(net.parameters(), lr=float(self.options["lr"]))
        images = np.asarray(train.images, np.float32)
        cutoff = float(self.options["cutoff"])

        def loss_of(idx: np.ndarray) -> Tensor:
            x = to_batch(images, idx, self.device) * 2 - 1
            return reconstruction_loss(net(high_pass(x, cutoff)), x, LossWeights())[0]

        return fit_steps(net, opt, len(images), budget, rng, loss_of)

    def _predict(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x = x * 2 - 1
        return _msgmsd(x, self.net(high_pass(x, float(self.options["cutoff"]))))  # type: ignore[misc]
