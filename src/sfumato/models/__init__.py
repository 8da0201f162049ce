"""Networks: VAE, U-Net, CLIP, toy MLP. Each has a config dataclass as its only constructor argument."""
