"""One sample's captured attention, preallocated and written in place as rows arrive.

Collecting per-chunk pieces and concatenating them at the end holds the result twice and copies
it twice (and fresh 100 MB blocks per layer cost millions of page faults). Here each row chunk
is written straight into its final place:

- on the CPU, one (L, H', T, N) tensor per sample: `result` hands it over without a copy;
- on an accelerator, one (H', T, N) tensor per layer on that layer's device (a device-map
  split puts layers on different GPUs), copied out at the end into one pinned host tensor with
  non-blocking copies and one synchronisation per device.

T is the response length when it is known (teacher forcing). During `generate` it is not: the
rows grow by doubling (amortised: each row is copied at most about once more).
"""

from __future__ import annotations

import torch

# Rows first reserved for an open-ended (generated) response.
_OPEN_ENDED_ROWS = 32


class ResultStore:
    """The (L, H', T, N) attention of one batch row."""

    def __init__(
        self, num_layers: int, num_heads: int, num_keys: int, rows: int | None, dtype: torch.dtype
    ) -> None:
        self.shape = (num_layers, num_heads, num_keys)
        self.dtype = dtype
        self.capacity = rows if rows is not None else _OPEN_ENDED_ROWS
        self.filled = [0] * num_layers  # rows written per layer (all rows below are set)
        self._host: torch.Tensor | None = None  # (L, H', capacity, N) when layers are on CPU
        self._device: dict[int, torch.Tensor] = {}  # layer index -> (H', capacity, N)

    def rows(self, layer_index: int, t0: int, t1: int, device: torch.device) -> torch.Tensor:
        """The (H', t1 - t0, N) slice of one layer to write rows [t0, t1) into."""
        if t1 > self.capacity:
            self._grow(max(t1, 2 * self.capacity))
        self.filled[layer_index] = max(self.filled[layer_index], t1)
        return self._layer(layer_index, device)[:, t0:t1]

    def _layer(self, li: int, device: torch.device) -> torch.Tensor:
        layers, heads, keys = self.shape
        if device.type == "cpu":
            if self._host is None:
                self._host = torch.empty(layers, heads, self.capacity, keys, dtype=self.dtype)
            return self._host[li]
        block = self._device.get(li)
        if block is None:
            block = torch.empty(heads, self.capacity, keys, dtype=self.dtype, device=device)
            self._device[li] = block
        return block

    def _grow(self, capacity: int) -> None:
        keep = max(self.filled, default=0)
        if self._host is not None:
            grown = self._host.new_empty(*self._host.shape[:2], capacity, self._host.shape[3])
            grown[:, :, :keep] = self._host[:, :, :keep]
            self._host = grown
        for li, block in self._device.items():
            grown = block.new_empty(block.shape[0], capacity, block.shape[2])
            grown[:, :keep] = block[:, :keep]
            self._device[li] = grown
        self.capacity = capacity

    def take(self, num_tokens: int | None = None) -> torch.Tensor:
        """The result on the CPU, (L, H', rows, N); rows a layer never saw are zero."""
        rows = max(self.filled, default=0)
        if num_tokens is not None:
            rows = min(rows, num_tokens)
        layers, heads, keys = self.shape
        if not self._device:
            if self._host is None:
                return torch.zeros(layers, heads, rows, keys, dtype=self.dtype)
            host = self._host
            self._host = None
            for li, filled in enumerate(self.filled):
                if filled < rows:
                    host[li, :, filled:rows] = 0
            # Teacher forcing fills the capacity exactly: the tensor itself, no copy.
            return host if rows == self.capacity else host[:, :, :rows].contiguous()
        pin = torch.cuda.is_available()
        # Pinned, so the device-to-host copies below are truly asynchronous.
        out = torch.empty(layers, heads, rows, keys, dtype=self.dtype, pin_memory=pin)
        devices = set()
        for li in range(layers):
            block = self._device.get(li)
            take = min(rows, self.filled[li])
            if block is not None:
                out[li, :, :take].copy_(block[:, :take], non_blocking=pin)
                devices.add(block.device)
            elif self._host is not None:  # a device-map split with some layers on the CPU
                out[li, :, :take] = self._host[li, :, :take]
            else:
                take = 0
            if take < rows:
                out[li, :, take:] = 0
        for device in devices:  # the one wait per sample (per device), not one per chunk
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
        self._device.clear()
        self._host = None
        return out
