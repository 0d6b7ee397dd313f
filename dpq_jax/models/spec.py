"""ModelSpec: what `dit.create_model` needs to rebuild a DiT (saved as a converted checkpoint's model.json)."""

from __future__ import annotations

import dataclasses

from dpq_jax.models import dit


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What `create_model` needs to rebuild a converted DiT."""

  name: str
  input_size: int
  num_classes: int = 1000
  learn_sigma: bool = True
  in_channels: int = 4

  def create(self, **kwargs) -> dit.DiT:
    return dit.create_model(
      self.name,
      input_size=self.input_size,
      num_classes=self.num_classes,
      learn_sigma=self.learn_sigma,
      in_channels=self.in_channels,
      **kwargs,
    )
