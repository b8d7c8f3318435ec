"""Training an ELLA connector: data sources (``data``), latent/feature caching (``cache``) and the loop (``train``).

The UNet, VAE and LLM are frozen; only the connector (and, for SDXL-style UNets, its pooling head)
learns, with the diffusion loss of the frozen UNet.
"""
