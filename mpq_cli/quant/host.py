"""State a training step reads in Python, kept on the host so reading it never waits for the device."""

from __future__ import annotations

import torch
from torch import nn


class HostMirrored(nn.Module):
    """A module with buffers whose values Python branches on in every forward pass.

    ``bool(buffer)`` or ``int(buffer)`` on a GPU tensor waits for every queued kernel: once
    per layer per step, it serialises the device with the host. The buffer stays what is
    saved (``state_dict``, checkpoints, packed files); a plain Python copy is what a step
    reads. Both change only through :meth:`set_host`, and loading a state dict refreshes
    the copies (one sync per load, not per step).
    """

    def register_host_buffer(self, name: str, value: bool | int, device=None) -> None:
        if "_host_values" not in self.__dict__:
            self._host_values: dict[str, bool | int] = {}
        self.register_buffer(name, torch.tensor(value, device=device))
        self._host_values[name] = value

    def host(self, name: str) -> bool | int:
        """The buffer's value, read without touching the device."""
        return self._host_values[name]

    def set_host(self, name: str, value: bool | int) -> None:
        getattr(self, name).fill_(value)  # queued on the device: no wait
        self._host_values[name] = type(self._host_values[name])(value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for name, old in self.__dict__.get("_host_values", {}).items():
            buffer = getattr(self, name)
            if buffer.device.type != "meta":
                self._host_values[name] = type(old)(buffer.item())
