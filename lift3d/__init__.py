"""lift3d: pretrain sparse 3D networks from frozen 2D networks through RGB-D frames."""
