"""Each stage and command end to end on tiny data: frames, teacher, points, pretrain, finetune,
distill2d, sweep, show, export."""
