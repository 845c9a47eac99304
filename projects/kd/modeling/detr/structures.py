"""The small records passed between the stages of a DETR: encoder memory, query groups, outputs.

Boxes are always cxcywh normalised to each image's own (unpadded) input size, so the same numbers
mean the same region to any model that sees the same images, whatever the batch's padding.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from detectron2.structures import ImageList
from torch import Tensor

__all__ = ["DETREncoded", "QueryGroup", "DecoderOutput", "DETRDetections"]


@dataclass
class DETREncoded:
    """Everything a DETR computes before its decoder; the input of every decoder pass.

    Attributes:
        memory: (B, S, D) encoder output, all feature levels flattened level after level.
        pos: (B, S, D) sine position embedding of each token plus its level embedding.
        padding_mask: (B, S) bool, True on tokens that lie in the batch padding.
        spatial_shapes: (L, 2) long, (height, width) of each level's padded map.
        level_start_index: (L,) long, offset of each level in ``S``.
        valid_ratios: (B, L, 2) the fraction (w, h) of each level's map that is image.
        image_sizes: (h, w) of each input image before padding; boxes are relative to these.
        images: the normalised, padded input batch.
        features: the backbone outputs, by name (for probes that pool backbone features).
        anchors: two-stage models only: (B, NUM_QUERIES, 4) the encoder proposals selected as the
            detection queries' anchors, detached (cxcywh in [0, 1]).
        proposal_logits: two-stage only: (B, NUM_QUERIES, K) class logits of the selected
            proposals, for the encoder loss.
        proposal_boxes: two-stage only: (B, NUM_QUERIES, 4) the selected proposals with gradient.
    """

    memory: Tensor
    pos: Tensor
    padding_mask: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor
    image_sizes: List[Tuple[int, int]]
    images: Optional[ImageList] = None
    features: Optional[Dict[str, Tensor]] = None
    anchors: Optional[Tensor] = None
    proposal_logits: Optional[Tensor] = None
    proposal_boxes: Optional[Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.memory.shape[0]

    def replace(self, **changes: Any) -> "DETREncoded":
        """A copy with some fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


@dataclass
class QueryGroup:
    """A set of queries decoded together, isolated from every other group.

    Attributes:
        anchors: (B, M, 4) cxcywh boxes in [0, 1], relative to each image's unpadded size.
        content: (B, M, D) content queries; None means zeros (the box alone asks the question).
    """

    anchors: Tensor
    content: Optional[Tensor] = None


@dataclass
class DecoderOutput:
    """The decoder's answers for a set of queries, at every decoder layer (last layer last).

    Attributes:
        logits: (L, B, M, K) class logits (sigmoid classification, no "no object" logit).
        boxes: (L, B, M, 4) predicted boxes, cxcywh in [0, 1] of each image.
        hidden: (L, B, M, D) normalised decoder states the heads read.
    """

    logits: Tensor
    boxes: Tensor
    hidden: Tensor

    @property
    def pred_logits(self) -> Tensor:
        """(B, M, K) logits of the last decoder layer."""
        return self.logits[-1]

    @property
    def pred_boxes(self) -> Tensor:
        """(B, M, 4) boxes of the last decoder layer."""
        return self.boxes[-1]

    @property
    def num_layers(self) -> int:
        return self.logits.shape[0]

    def select(self, queries: slice) -> "DecoderOutput":
        """The outputs of a contiguous range of queries."""
        return DecoderOutput(
            self.logits[:, :, queries], self.boxes[:, :, queries], self.hidden[:, :, queries]
        )


@dataclass
class DETRDetections:
    """The detection path's outputs (:meth:`DETR.detect`).

    Attributes:
        queries: the detection ("matching") queries' outputs.
        denoising: training with denoising only: the denoising queries' outputs.
        denoising_meta: how the denoising queries map to the GT boxes (see ``denoising.py``).
        proposal_logits: two-stage only: see :class:`DETREncoded`.
        proposal_boxes: two-stage only: see :class:`DETREncoded`.
    """

    queries: DecoderOutput
    denoising: Optional[DecoderOutput] = None
    denoising_meta: Optional[Any] = None
    proposal_logits: Optional[Tensor] = None
    proposal_boxes: Optional[Tensor] = None
