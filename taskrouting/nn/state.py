"""Loading a routing layer's state_dict all or nothing, with masks checked as the constructor checks them."""
from __future__ import annotations

import itertools

import torch

from .masks import check_masks

__all__ = ["CheckedStateLoad"]


class CheckedStateLoad:
    """Mixin for modules with a ``masks`` buffer: ``load_state_dict`` first checks every entry of
    the module (shapes, and masks binary with a channel per task, of the layer's ``[T, C]``) and
    loads nothing when one is wrong, so a rejected call leaves the module as it was."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        errors = []
        key = prefix + "masks"
        if key in state_dict:
            try:
                masks = check_masks(state_dict[key], self.masks.shape[1])
                if masks.shape != self.masks.shape:
                    raise ValueError(f"masks have shape {tuple(masks.shape)} but this layer's are "
                                     f"{tuple(self.masks.shape)} [num_tasks, num_channels]")
                state_dict = {**state_dict, key: masks}
            except (TypeError, ValueError) as e:
                errors.append(f"{prefix}{e}")
        for name, current in itertools.chain(self._parameters.items(), self._buffers.items()):
            entry = state_dict.get(prefix + name)
            if current is None or entry is None or name == "masks":
                continue
            if not isinstance(entry, torch.Tensor):
                errors.append(f"{prefix}{name}: expected a Tensor, got {type(entry).__name__}")
            elif entry.shape != current.shape and not (name == "num_batches_tracked" and entry.numel() == 1):
                errors.append(f"size mismatch for {prefix}{name}: copying a param with shape "
                              f"{tuple(entry.shape)}, the shape in current model is {tuple(current.shape)}.")
        if errors:
            error_msgs.extend(errors)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
