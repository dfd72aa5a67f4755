"""One model split over several processes started by ``mlx.launch``: the group, the split, lock-step serving."""
