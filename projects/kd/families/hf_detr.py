"""Hugging Face ``transformers`` DETR teachers: RT-DETR, RT-DETR v2, D-FINE, DAB-DETR and
two-stage Deformable DETR, as the DETR distillers' teacher (``KD.TEACHER.CONFIG_FILE
"hf://<folder or hub id>"``).

A detector-family adapter. It answers the DETR distillers (:class:`~kd.meta_arch.kd_detr.
KDDETRDistiller`, :class:`~kd.meta_arch.hetero.DETRToRCNNDistiller` through
:func:`kd.probes.probe_detr`) the same questions the project's own
:class:`~kd.modeling.detr.DETR` answers, and nothing else. The interface, all of it:

* ``num_classes`` (K, the model's class columns), ``class_names`` (K names, from
  ``config.id2label``; COCO's 91-id spaces keep their "N/A" holes, which match no student class),
  ``num_decoder_layers`` (the layers it answers at), ``hidden_dim``;
* ``encode(batched_inputs) -> HFEncoded``: the batch (detectron2 dicts, "image" 0-255 in the
  teacher's channel order, RGB) made the model's input by its own processor conventions, run up to
  its decoder, which is not run: a forward pre-hook on ``model.model.decoder`` (``with_kwargs``)
  records the decoder's keyword arguments (encoder memory, masks, spatial shapes, level start
  index, valid ratios, the model's own queries) and stops the forward;
* ``detection_anchors(encoded)`` / ``detection_content(encoded)``: the model's own detection
  queries for the batch, (B, N, 4) cxcywh boxes in [0, 1] and (B, N, D) content;
* ``decode_groups(encoded, groups) -> [DecoderOutput]``: query groups (boxes, content or None for
  zeros) decoded in one pass over the recorded memory, isolated from each other by a
  self-attention mask; ``decode(encoded, content, anchors, blocked)`` the same with any mask;
  logits (L, B, M, K) sigmoid class logits and boxes (L, B, M, 4) per answered decoder layer;
* ``forward(batched_inputs)`` in eval mode: detectron2 predictions (``[{"instances"}]``), for the
  teacher's AP check.

How each family takes a box as a query (measured on tiny random models; tests/test_hf_teacher.py):

* RT-DETR, RT-DETR v2, D-FINE: ``decoder(inputs_embeds=content, reference_points=logit(box),
  encoder_attention_mask=mask)``; in these decoders ``encoder_attention_mask`` is the queries'
  self-attention mask. D-FINE in eval mode answers at its ``eval_idx`` layer only (L = 1).
* DAB-DETR: ``decoder(inputs_embeds=content, query_position_embeddings=logit(box))``; its decoder
  passes no self-attention mask, so one is set by forward pre-hooks on each layer's ``self_attn``.
  Its own content queries are zeros.
* Deformable DETR, two-stage (``two_stage=True``, ``with_box_refine=True``): a box's query is the
  model's own ``pos_trans_norm(pos_trans(get_proposal_pos_embed(logit(box))))``, split into the
  positional query and the content (the given content replaces the latter), with the box as
  reference point; the mask is set as for DAB-DETR.

DETR, Conditional DETR and single-stage Deformable DETR have learned positional queries that
cannot express a box, so distillation points cannot be put to them: they are refused in one line.

Input: RGB in [0, 1]; DETR-style models (DAB, Deformable) ImageNet mean/std, the processor's
resize (shortest edge) and zero padding with a ``pixel_mask``; RT-DETR and D-FINE no
normalisation and a fixed resize (640 x 640) without padding. A ``preprocessor_config.json`` in the
folder overrides these defaults (``do_resize``, ``size``, ``do_rescale``, ``rescale_factor``,
``do_normalize``, ``image_mean``, ``image_std``). Boxes are relative to each image's unpadded
input, as the project's points are, so a point means the same region to the student and the teacher.
"""

import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

from kd.families.hf_source import (
    DAB_STYLE,
    DEFORMABLE_STYLE,
    FAMILIES,
    HF_PREFIX,
    RT_STYLE,
    HFTeacherError,
    check_family,
    input_processing,
    is_hf_source,
    load_hf_detector,
    target_size,
    weights_file,
)
from kd.families.registry import register_model_class_family
from kd.modeling.detr.box_ops import inverse_sigmoid
from kd.modeling.detr.structures import DecoderOutput, QueryGroup

__all__ = [
    "HFDETRFamily",
    "HF_PREFIX",
    "FAMILIES",
    "HFEncoded",
    "HFDETRTeacher",
    "HFTeacherError",
    "load_hf_detector",
    "is_hf_source",
    "weights_file",
]

logger = logging.getLogger(__name__)


class _Captured(Exception):
    """Raised by the decoder pre-hook to stop the forward once the decoder's inputs are known."""


@dataclass
class HFEncoded:
    """A batch encoded by a Hugging Face DETR, up to (not including) its decoder.

    Attributes:
        memory: (B, S, D) the encoder memory the decoder attends to (its device and dtype are the
            batch's).
        decoder_kwargs: the decoder's keyword arguments as the model called it, without the
            queries (content, boxes) and without the self-attention mask.
        anchors: (B, N, 4) the model's own detection queries' boxes, cxcywh in [0, 1].
        content: (B, N, D) their content queries.
        image_sizes: (h, w) of each input image as the distiller received it.
        anchor_logits: (B, N, 4) the model's own boxes as it passed them (logits; None for
            two-stage Deformable DETR, which passes boxes), to decode its own queries exactly.
        images, features: always None (kept so that callers can drop them as for a DETR).
    """

    memory: Tensor
    decoder_kwargs: Dict[str, Any]
    anchors: Tensor
    content: Tensor
    image_sizes: List[Tuple[int, int]]
    anchor_logits: Optional[Tensor] = None
    images: Optional[Any] = None
    features: Optional[Any] = None

    @property
    def batch_size(self) -> int:
        return self.memory.shape[0]

    def replace(self, **changes: Any) -> "HFEncoded":
        return replace(self, **changes)


# ----------------------------------------------------------------------------- the adapter
class HFDETRTeacher(nn.Module):
    """A Hugging Face DETR-family detector behind the interface the DETR distillers use (see the
    module docstring). Build it with :meth:`from_source`; freeze it as any teacher."""

    def __init__(self, model: nn.Module, processor: Optional[dict] = None, source: str = ""):
        """
        Args:
            model: an ``...ForObjectDetection`` of a supported family.
            processor: its saved processor config (``preprocessor_config.json``), or None for the
                family's defaults.
            source: where it came from (for messages).
        """
        super().__init__()
        self.model_type = check_family(model.config, source)
        self.family = FAMILIES[self.model_type]
        self.model = model
        self.source = source
        self.processing = input_processing(self.model_type, processor)
        self.register_buffer(
            "pixel_mean", torch.tensor(self.processing.mean).view(3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(self.processing.std).view(3, 1, 1), persistent=False
        )
        self.detections_per_image = 100

    @classmethod
    def from_source(cls, source: str) -> "HFDETRTeacher":
        """Load the model named by ``source`` (a folder or hub id, with or without ``hf://``)."""
        if source.startswith(HF_PREFIX):
            source = source[len(HF_PREFIX) :]
        model, processor = load_hf_detector(source)
        return cls(model, processor, source)

    # ------------------------------------------------------------------ description
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def num_classes(self) -> int:
        return int(self.config.num_labels)

    @property
    def class_names(self) -> List[str]:
        id2label = self.config.id2label
        return [str(id2label.get(i, id2label.get(str(i), "N/A"))) for i in range(self.num_classes)]

    @property
    def hidden_dim(self) -> int:
        config = self.config
        return int(getattr(config, "d_model", None) or config.hidden_size)

    @property
    def num_decoder_layers(self) -> int:
        if self.model_type == "d_fine":
            # In eval mode D-FINE's decoder answers at its eval_idx layer only (and, when that is
            # layer 0, at the pre-box head before it).
            layers = self.config.decoder_layers
            eval_idx = self.config.eval_idx % layers
            return 2 if eval_idx == 0 else 1
        return int(self.config.decoder_layers)

    # ------------------------------------------------------------------ input
    def preprocess(self, batched_inputs: List[dict]) -> Tuple[Tensor, Tensor]:
        """The batch as the model's processor would give it: (pixel_values, pixel_mask).

        Images arrive 0-255 in RGB (the teacher's input format); each is resized as the processor
        resizes, rescaled, normalised, and padded at the bottom/right (a mask marks the image).
        """
        p = self.processing
        images = []
        for x in batched_inputs:
            img = x["image"].to(self.device).float()
            if p.resize:
                size = target_size(img.shape[-2], img.shape[-1], p.size)
                if size != tuple(img.shape[-2:]):
                    img = F.interpolate(
                        img[None], size=size, mode="bilinear", align_corners=False, antialias=True
                    )[0]
            img = img * p.rescale
            if p.normalize:
                img = (img - self.pixel_mean) / self.pixel_std
            images.append(img)
        sizes = {tuple(i.shape[-2:]) for i in images}
        if len(sizes) > 1 and not p.pad:
            raise HFTeacherError(
                f"{HF_PREFIX}{self.source}: the batch's images have sizes {sorted(sizes)} after "
                "the processor's resize, and this model's processor does not pad; set its size "
                "to a fixed height and width"
            )
        batch = ImageList.from_tensors(images, 1)
        mask = torch.zeros(batch.tensor.shape[0], *batch.tensor.shape[-2:], dtype=torch.long)
        for i, (h, w) in enumerate(batch.image_sizes):
            mask[i, :h, :w] = 1
        return batch.tensor, mask.to(self.device)

    # ------------------------------------------------------------------ encode
    def encode(self, batched_inputs: List[dict]) -> HFEncoded:
        """Everything up to the decoder (see the module docstring)."""
        pixel_values, pixel_mask = self.preprocess(batched_inputs)
        recorded: Dict[str, Any] = {}

        def record(module, args, kwargs):
            if args:
                raise HFTeacherError(
                    f"{type(module).__name__} was called with positional arguments; this "
                    "transformers version is not one the adapter knows"
                )
            recorded.update(kwargs)
            raise _Captured

        handle = self.model.model.decoder.register_forward_pre_hook(record, with_kwargs=True)
        try:
            self.model.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        except _Captured:
            pass
        finally:
            handle.remove()
        sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
        return self._encoded(recorded, sizes)

    def _encoded(self, kw: Dict[str, Any], sizes: List[Tuple[int, int]]) -> HFEncoded:
        # float32 as every teacher answer is (under KD.TEACHER.DTYPE the decoder's own calls still
        # run in the teacher's precision): the points drawn from the memory's dtype stay float32.
        kw = {
            k: v.float() if isinstance(v, Tensor) and v.is_floating_point() else v
            for k, v in kw.items()
        }
        for k in ("output_attentions", "output_hidden_states", "return_dict"):
            kw.pop(k, None)
        content = kw.pop("inputs_embeds")
        logits = None
        if self.family == RT_STYLE:
            kw.pop("encoder_attention_mask", None)
            logits = kw.pop("reference_points")
            anchors = logits.sigmoid()
        elif self.family == DAB_STYLE:
            logits = kw.pop("query_position_embeddings")
            anchors = logits.sigmoid()
        else:
            anchors = kw.pop("reference_points")
            # Made from the boxes again when decoding (exactly as the model makes it).
            kw.pop("object_queries_position_embeddings")
        return HFEncoded(
            memory=kw["encoder_hidden_states"],
            decoder_kwargs=kw,
            anchors=anchors,
            content=content,
            image_sizes=sizes,
            anchor_logits=logits,
        )

    def detection_anchors(self, encoded: HFEncoded) -> Tensor:
        """(B, N, 4) the model's own detection queries' boxes for this batch, cxcywh in [0, 1]."""
        return encoded.anchors

    def detection_content(self, encoded: HFEncoded) -> Tensor:
        """(B, N, D) the model's own detection queries' content for this batch."""
        return encoded.content

    # ------------------------------------------------------------------ decode
    def decode_groups(
        self, encoded: HFEncoded, groups: Sequence[QueryGroup]
    ) -> List[DecoderOutput]:
        """Decode query groups over the recorded memory, isolated from each other.

        Args:
            encoded: from :meth:`encode`.
            groups: each with anchors (B, M_g, 4) cxcywh in [0, 1] and content (B, M_g, D) or None
                (zeros; for two-stage Deformable DETR, the content the model makes from the box).

        Returns:
            One :class:`DecoderOutput` per group: logits (L, B, M_g, K), boxes (L, B, M_g, 4).
        """
        if not groups:
            return []
        batch = encoded.batch_size
        contents, anchors, sizes = [], [], []
        for i, group in enumerate(groups):
            a = group.anchors
            if a.dim() != 3 or a.shape[0] != batch or a.shape[2] != 4:
                raise ValueError(
                    f"group {i}: anchors must be ({batch}, M, 4), got {tuple(a.shape)}"
                )
            contents.append(group.content)
            anchors.append(a.to(encoded.memory.dtype))
            sizes.append(a.shape[1])
        blocked = None
        if len(groups) > 1:
            blocked = torch.ones(sum(sizes), sum(sizes), dtype=torch.bool, device=self.device)
            start = 0
            for size in sizes:
                blocked[start : start + size, start : start + size] = False
                start += size
        if all(c is None for c in contents):
            content = None
        else:
            content = torch.cat(
                [self._default_content(a) if c is None else c for c, a in zip(contents, anchors)],
                1,
            )
        out = self.decode(encoded, content, torch.cat(anchors, 1), blocked)
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        return [out.select(slice(s, e)) for s, e in zip(starts[:-1], starts[1:])]

    def _default_content(self, anchors: Tensor) -> Tensor:
        if self.family == DEFORMABLE_STYLE:
            return self._box_queries(anchors)[1]
        return anchors.new_zeros(*anchors.shape[:2], self.hidden_dim)

    def _box_queries(self, anchors: Tensor) -> Tuple[Tensor, Tensor]:
        """Two-stage Deformable DETR: the (position, content) queries it makes from boxes."""
        inner = self.model.model
        out = inner.pos_trans_norm(inner.pos_trans(inner.get_proposal_pos_embed(_logit(anchors))))
        return torch.split(out, self.hidden_dim, dim=2)

    def decode(
        self,
        encoded: HFEncoded,
        content: Optional[Tensor],
        anchors: Tensor,
        blocked: Optional[Tensor] = None,
        anchor_logits: Optional[Tensor] = None,
    ) -> DecoderOutput:
        """One decoder pass of the given queries over the recorded memory.

        Args:
            encoded: from :meth:`encode`.
            content: (B, M, D) content queries, or None (see :meth:`decode_groups`).
            anchors: (B, M, 4) boxes, cxcywh in [0, 1].
            blocked: (M, M) or (B, M, M) bool, True where self-attention is blocked; None: all
                queries attend to each other.
            anchor_logits: the boxes as logits, when known exactly (the model's own queries,
                :attr:`HFEncoded.anchor_logits`); None: the logit of ``anchors``.

        Returns:
            logits (L, B, M, K) and boxes (L, B, M, 4) at each answered layer; ``hidden`` the
            final decoder state (L, B, M, D) repeated per layer.
        """
        anchors = anchors.clamp(0.0, 1.0)
        if anchor_logits is None:
            anchor_logits = _logit(anchors)
        if content is None:
            content = self._default_content(anchors)
        mask = None
        if blocked is not None:
            if blocked.dim() == 2:
                blocked = blocked[None].expand(anchors.shape[0], -1, -1)
            mask = torch.zeros(blocked.shape, dtype=content.dtype, device=content.device)
            mask = mask.masked_fill(blocked, torch.finfo(content.dtype).min)[:, None]
        kw = encoded.decoder_kwargs
        if self.family == RT_STYLE:
            out = self.model.model.decoder(
                **kw,
                inputs_embeds=content,
                reference_points=anchor_logits,
                encoder_attention_mask=mask,
            )
            logits = out.intermediate_logits.transpose(0, 1)
            boxes = out.intermediate_reference_points.transpose(0, 1)
            hidden = out.last_hidden_state
        elif self.family == DAB_STYLE:
            with self._self_attention_mask(mask):
                out = self.model.model.decoder(
                    **kw, inputs_embeds=content, query_position_embeddings=anchor_logits
                )
            logits, boxes = self._dab_heads(out)
            hidden = out.last_hidden_state
        else:
            position, _ = self._box_queries(anchors)
            with self._self_attention_mask(mask):
                out = self.model.model.decoder(
                    **kw,
                    inputs_embeds=content,
                    object_queries_position_embeddings=position,
                    reference_points=anchors,
                )
            logits, boxes = self._deformable_heads(out, anchors)
            hidden = out.last_hidden_state
        hidden = hidden[None].expand(logits.shape[0], -1, -1, -1)
        return DecoderOutput(logits, boxes, hidden)

    @contextmanager
    def _self_attention_mask(self, mask: Optional[Tensor]):
        """Sets every decoder layer's self-attention mask (DAB, Deformable decoders pass none)."""
        if mask is None:
            yield
            return

        def set_mask(module, args, kwargs):
            return args, dict(kwargs, attention_mask=mask)

        handles = [
            layer.self_attn.register_forward_pre_hook(set_mask, with_kwargs=True)
            for layer in self.model.model.decoder.layers
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _dab_heads(self, out) -> Tuple[Tensor, Tensor]:
        # DabDetrForObjectDetection's heads, at every layer (its aux-loss outputs).
        m = self.model
        hidden = out.intermediate_hidden_states
        logits = m.class_embed(hidden)
        boxes = m.bbox_predictor(hidden)
        boxes[..., :4] += inverse_sigmoid(out.reference_points)
        return logits, boxes.sigmoid()

    def _deformable_heads(self, out, init_reference: Tensor) -> Tuple[Tensor, Tensor]:
        # DeformableDetrForObjectDetection's per-layer heads over the decoder's states.
        m = self.model
        hidden = out.intermediate_hidden_states
        refs = out.intermediate_reference_points
        logits, boxes = [], []
        for level in range(hidden.shape[1]):
            reference = init_reference if level == 0 else refs[:, level - 1]
            logits.append(m.class_embed[level](hidden[:, level]))
            boxes.append(
                (m.bbox_embed[level](hidden[:, level]) + inverse_sigmoid(reference)).sigmoid()
            )
        return torch.stack(logits), torch.stack(boxes)

    # ------------------------------------------------------------------ inference
    def forward(self, batched_inputs: List[dict]) -> List[Dict[str, Instances]]:
        """Predictions for the teacher's AP check: the detection queries' top-k (query, class)
        pairs by sigmoid score, boxes in each input's ``height`` x ``width``."""
        encoded = self.encode(batched_inputs)
        out = self.decode(
            encoded, encoded.content, encoded.anchors, anchor_logits=encoded.anchor_logits
        )
        logits, boxes = out.logits[-1], out.boxes[-1]
        _, n, k = logits.shape
        top = min(self.detections_per_image, n * k)
        scores, index = logits.sigmoid().flatten(1).topk(top, dim=1)
        query = torch.div(index, k, rounding_mode="floor")
        picked = boxes.gather(1, query[..., None].expand(-1, -1, 4))
        cx, cy, w, h = picked.unbind(-1)
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
        results = []
        for i, x in enumerate(batched_inputs):
            height = x.get("height", x["image"].shape[-2])
            width = x.get("width", x["image"].shape[-1])
            r = Instances((height, width))
            r.pred_boxes = Boxes(xyxy[i] * xyxy.new_tensor([width, height, width, height]))
            r.pred_boxes.clip((height, width))
            r.scores = scores[i]
            r.pred_classes = index[i] % k
            results.append({"instances": r})
        return results


def _logit(boxes: Tensor) -> Tensor:
    # The models' own inverse sigmoid (eps 1e-5); exact on boxes inside (0, 1).
    return inverse_sigmoid(boxes)


# A DETR to the distillers.
HFDETRFamily = register_model_class_family("DETR", HFDETRTeacher)
