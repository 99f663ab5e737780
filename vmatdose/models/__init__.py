"""Networks and the diffusion / flow-matching maths of the generative dose models."""
