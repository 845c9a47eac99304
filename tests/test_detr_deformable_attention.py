"""Multi-scale deformable attention against a direct bilinear-sampling loop."""

import math

import pytest
import torch

from kd.modeling.detr.ms_deform_attn import MSDeformAttn, ms_deform_attn

SHAPES = [(4, 5), (2, 3)]


def _bilinear(feature: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Value of a (C, H, W) map at continuous pixel coordinates (centres at integers + 0.5 of
    the normalised [0, 1] range), zero outside."""
    _, height, width = feature.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(feature.shape[0], dtype=feature.dtype)
    for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        if 0 <= xi < width and 0 <= yi < height:
            out += (1 - abs(px - xi)) * (1 - abs(py - yi)) * feature[:, yi, xi]
    return out


def _reference(value, shapes, locations, weights):
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads, head_dim, dtype=value.dtype)
    for b in range(batch):
        for h in range(heads):
            maps = [
                value[b, starts[lv] : starts[lv + 1], h].T.reshape(head_dim, *shapes[lv])
                for lv in range(levels)
            ]
            for q in range(queries):
                for lv in range(levels):
                    for p in range(points):
                        x, y = locations[b, q, h, lv, p].tolist()
                        sample = _bilinear(maps[lv], x, y)
                        out[b, q, h] += weights[b, q, h, lv, p] * sample
    return out.flatten(2)


def _inputs(generator, dtype=torch.float32):
    batch, heads, head_dim, queries, points = 2, 2, 3, 4, 3
    total = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, total, heads, head_dim, generator=generator, dtype=dtype)
    # Some locations fall outside the maps, where the result reads zeros.
    loc = torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=generator)
    loc = (loc * 1.4 - 0.2).to(dtype)
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, generator=generator)
    weights = (weights / weights.sum((-1, -2), keepdim=True)).to(dtype)
    shapes = torch.tensor(SHAPES)
    starts = torch.tensor([0, SHAPES[0][0] * SHAPES[0][1]])
    return value, shapes, starts, loc, weights


def test_ms_deform_attn_equals_direct_bilinear_sampling():
    value, shapes, starts, loc, weights = _inputs(torch.Generator().manual_seed(0))
    out = ms_deform_attn(value, shapes, starts, loc, weights)
    expected = _reference(value, SHAPES, loc, weights)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_ms_deform_attn_gradients():
    value, shapes, starts, loc, weights = _inputs(torch.Generator().manual_seed(1), torch.double)
    # Keep the points away from cell centres, where bilinear interpolation has a kink.
    loc = loc.clamp(0.05, 0.95)
    value.requires_grad_(True)
    loc.requires_grad_(True)
    weights.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, loc_, w: ms_deform_attn(v, shapes, starts, loc_, w),
        (value, loc, weights),
        atol=1e-5,
    )


@pytest.mark.parametrize("reference_dim", [2, 4])
def test_module_samples_around_its_reference(reference_dim):
    # With the offsets switched off, every point of a query samples its reference centre; the
    # module output is then the projected value interpolated there, whatever the box size.
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=3)
    torch.nn.init.zeros_(attn.sampling_offsets.bias)
    value = torch.randn(1, sum(h * w for h, w in SHAPES), 8)
    query = torch.randn(1, 2, 8)
    centre = torch.tensor([[0.3, 0.6], [0.55, 0.2]])
    reference = centre if reference_dim == 2 else torch.cat([centre, torch.full((2, 2), 0.3)], 1)
    reference = reference[None, :, None].expand(1, 2, 2, reference_dim)
    shapes = torch.tensor(SHAPES)
    starts = torch.tensor([0, 20])
    out = attn(query, reference, value, shapes, starts)
    projected = attn.value_proj(value)[0]
    weights = attn.attention_weights(query).view(1, 2, 2, 6).softmax(-1).view(1, 2, 2, 2, 3)
    for q in range(2):
        per_head = []
        for h in range(2):
            acc = torch.zeros(4)
            for lv, (height, width) in enumerate(SHAPES):
                start = 0 if lv == 0 else 20
                fmap = projected[start : start + height * width, h * 4 : (h + 1) * 4]
                sample = _bilinear(fmap.T.reshape(4, height, width), *centre[q].tolist())
                acc += weights[0, q, h, lv].sum() * sample
            per_head.append(acc)
        expected = attn.output_proj(torch.cat(per_head))
        torch.testing.assert_close(out[0, q], expected, atol=1e-5, rtol=1e-5)
