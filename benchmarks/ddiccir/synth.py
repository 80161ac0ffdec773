import torch
def planted_maps(seed, n_groups=4, per_group=25, channels=16, size=7, noise=0.05, image_seed=None):
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    motifs = torch.zeros(n_groups, 3, channels)
    centres = torch.randint(1, size - 1, (n_groups, 3, 2), generator=g)
    for group in range(n_groups):
        for j in range(3):
            chosen = torch.randperm(channels, generator=g)[:4]
            motifs[group, j, chosen] = 1 + torch.rand(4, generator=g)
    if image_seed is not None:
        g = torch.Generator().manual_seed(image_seed)
    maps, groups = [], []
    for group in range(n_groups):
        for _ in range(per_group):
            image = torch.zeros(channels, size, size)
            for j in range(3):
                cy, cx = (centres[group, j] + torch.randint(-1, 2, (2,), generator=g)).tolist()
                blob = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / 2.0)
                amplitude = 0.5 + torch.rand(1, generator=g)
                image += amplitude * motifs[group, j][:, None, None] * blob
            image += noise * torch.randn(channels, size, size, generator=g)
            maps.append(image.clamp_min(0))
            groups.append(group)
    maps = torch.stack(maps)
    return maps, maps.mean(dim=(2, 3)), torch.tensor(groups)
