"""The shipped job configs under their checkout paths; the configs themselves are in dpq_jax/configs/."""
