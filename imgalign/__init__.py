"""imgalign: align diffusion and flow-matching image generators with human preference.

Layers (see the README): ``pipelines`` (adapters over diffusers pipelines), ``rewards``
(reward models with one differentiable contract) and ``imgalign`` (algorithms, samplers,
trainers and the command line), which uses the other two through their public API only.
The Shapes world's rewards and pipelines are registered through package entry points
(``pyproject.toml``), not by importing this package.
"""

__version__ = "0.1.0"

