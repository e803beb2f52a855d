"""Every network: 2D backbones, the sparse Res16UNet family, the heads, and the 2D PSPNet."""
