"""imgalign: align diffusion and flow-matching image generators with human preference.

Layers (see the README): ``pipelines`` (adapters over diffusers pipelines), ``rewards``
(reward models with one differentiable contract) and ``imgalign`` (algorithms, samplers,
trainers and the command line), which uses the other two through their public API only.
"""

__version__ = "0.1.0"


def _register_rewards() -> None:
    """Make the Shapes rewards loadable by name everywhere a reward name is accepted."""
    import rewards

    rewards.register("shapes-oracle", "imgalign.shapes.rewards:shapes_oracle", overwrite=True)
    rewards.register("shapes-clip", "imgalign.shapes.clip:shapes_clip", overwrite=True)
    rewards.register("shapes-clip-contrast", "imgalign.shapes.clip:shapes_clip_contrast", overwrite=True)
    rewards.register("shapes-verifier", "imgalign.shapes.verifier:shapes_verifier", overwrite=True)
    rewards.register("shapes-preference", "imgalign.shapes.preference:shapes_preference", overwrite=True)
    rewards.register("shapes-edit-reward-base", "imgalign.shapes.edit_reward:shapes_edit_reward", overwrite=True)
    rewards.register("shapes-edit-reward", "imgalign.shapes.edit_reward:shipped_edit_reward", overwrite=True)


_register_rewards()
