"""The DETR-family meta-architecture: DAB-DETR, Deformable DETR and DINO by configuration.

Besides ``forward``, the model exposes the stages separately so that a distiller can run the
encoder once and then decode the detection queries and any number of isolated query groups:

    encoded = model.encode(batched_inputs)         # backbone + encoder (+ query selection)
    losses = model.forward_encoded(encoded, batched_inputs)   # = forward(batched_inputs)
    outputs = model.decode_groups(encoded, [QueryGroup(anchors), ...])   # distillation points

``forward_encoded`` is ``detect`` (detection and, in training, denoising queries) followed by
``losses`` in training or ``inference`` at test time; each is public for finer control.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

from kd.modeling.detr.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from kd.modeling.detr.criterion import SetCriterion
from kd.modeling.detr.decoder import AnchorDecoder
from kd.modeling.detr.denoising import DenoisingQueries
from kd.modeling.detr.encoder import DETREncoder
from kd.modeling.detr.layers import block_diagonal_mask
from kd.modeling.detr.matcher import HungarianMatcher
from kd.modeling.detr.neck import InputProjection
from kd.modeling.detr.query_selection import QuerySelection
from kd.modeling.detr.structures import DecoderOutput, DETRDetections, DETREncoded, QueryGroup

__all__ = ["DETR"]


@META_ARCH_REGISTRY.register()
class DETR(nn.Module):
    """DETR with anchor-box queries (DAB-DETR), optionally deformable multi-scale attention
    (Deformable DETR), encoder query selection and contrastive denoising (DINO).

    All boxes exchanged with the outside are cxcywh normalised to each image's own unpadded input
    size, with sigmoid classification over ``num_classes`` (no "no object" logit).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_features: List[str],
        input_proj: InputProjection,
        encoder: DETREncoder,
        decoder: AnchorDecoder,
        criterion: SetCriterion,
        num_classes: int,
        num_queries: int,
        query_selection: Optional[QuerySelection] = None,
        denoising: Optional[DenoisingQueries] = None,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
        size_divisibility: int = 32,
        detections_per_image: int = 100,
        input_format: Optional[str] = None,
    ):
        """
        Args:
            backbone: any detectron2 backbone producing ``in_features``.
            in_features: backbone outputs used, finest first.
            input_proj: maps them (and extra levels) to D channels.
            encoder: flattens and encodes the levels.
            decoder: decodes anchor-box queries, with per-layer heads.
            criterion: Hungarian matching and the losses.
            num_classes: K.
            num_queries: detection queries (and, with query selection, proposals kept).
            query_selection: two-stage: selects the detection anchors from encoder proposals;
                None: the anchors are learned, one per query.
            denoising: DINO's denoising queries in training; None disables them.
            pixel_mean, pixel_std: per-channel input normalisation.
            size_divisibility: images are padded to a multiple of this.
            detections_per_image: top-k (query, class) pairs kept at test time.
            input_format: the channel order of input images ("BGR" / "RGB"), for callers.
        """
        super().__init__()
        self.backbone = backbone
        self.in_features = list(in_features)
        self.input_proj = input_proj
        self.encoder = encoder
        self.decoder = decoder
        self.criterion = criterion
        self.query_selection = query_selection
        self.denoising = denoising
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.size_divisibility = size_divisibility
        self.detections_per_image = detections_per_image
        self.input_format = input_format
        hidden_dim = decoder.d_model
        self.query_content = nn.Embedding(num_queries, hidden_dim)
        if query_selection is None:
            # Learned anchors in logit space: centres spread uniformly over the image, sizes
            # around a quarter to three quarters of it (sigmoid of a standard normal).
            anchors = torch.empty(num_queries, 4)
            anchors[:, :2].uniform_(0.0, 1.0)
            anchors[:, :2] = torch.logit(anchors[:, :2].clamp(0.01, 0.99))
            anchors[:, 2:].normal_()
            self.query_anchor_logits = nn.Parameter(anchors)
        else:
            self.register_parameter("query_anchor_logits", None)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DETR
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        shapes = backbone.output_shape()
        missing = [f for f in d.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.DETR.IN_FEATURES {list(d.IN_FEATURES)}: the backbone does not produce "
                f"{missing} (it produces {sorted(shapes)}; for ResNets set "
                "MODEL.RESNETS.OUT_FEATURES)"
            )
        num_levels = d.NUM_FEATURE_LEVELS
        extra = num_levels - len(d.IN_FEATURES)
        largest_stride = max(shapes[f].stride for f in d.IN_FEATURES) * 2 ** max(extra, 0)
        transformer = dict(
            d_model=d.HIDDEN_DIM,
            nheads=d.NHEADS,
            dim_feedforward=d.DIM_FEEDFORWARD,
            dropout=d.DROPOUT,
            attention=d.ATTENTION,
            num_levels=num_levels,
        )
        matcher = HungarianMatcher(
            cost_class=d.COST_CLASS,
            cost_bbox=d.COST_BBOX,
            cost_giou=d.COST_GIOU,
            focal_alpha=d.FOCAL_ALPHA,
            focal_gamma=d.FOCAL_GAMMA,
        )
        denoising = None
        if d.DENOISING.ENABLED:
            denoising = DenoisingQueries(
                num_classes=d.NUM_CLASSES,
                d_model=d.HIDDEN_DIM,
                nheads=d.NHEADS,
                max_queries=d.DENOISING.MAX_QUERIES,
                label_noise_ratio=d.DENOISING.LABEL_NOISE_RATIO,
                box_noise_scale=d.DENOISING.BOX_NOISE_SCALE,
            )
        return {
            "backbone": backbone,
            "in_features": d.IN_FEATURES,
            "input_proj": InputProjection(
                [shapes[f].channels for f in d.IN_FEATURES], d.HIDDEN_DIM, num_levels
            ),
            "encoder": DETREncoder(
                num_layers=d.ENC_LAYERS,
                n_points=d.ENC_N_POINTS,
                pe_temperature=d.PE_TEMPERATURE,
                **transformer,
            ),
            "decoder": AnchorDecoder(
                num_layers=d.DEC_LAYERS,
                n_points=d.DEC_N_POINTS,
                num_classes=d.NUM_CLASSES,
                **transformer,
            ),
            "criterion": SetCriterion(
                num_classes=d.NUM_CLASSES,
                matcher=matcher,
                class_weight=d.CLASS_WEIGHT,
                bbox_weight=d.BBOX_WEIGHT,
                giou_weight=d.GIOU_WEIGHT,
                focal_alpha=d.FOCAL_ALPHA,
                focal_gamma=d.FOCAL_GAMMA,
            ),
            "num_classes": d.NUM_CLASSES,
            "num_queries": d.NUM_QUERIES,
            "query_selection": (
                QuerySelection(d.HIDDEN_DIM, d.NUM_CLASSES, d.NUM_QUERIES) if d.TWO_STAGE else None
            ),
            "denoising": denoising,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": d.SIZE_DIVISIBILITY or largest_stride,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "input_format": cfg.INPUT.FORMAT,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def hidden_dim(self) -> int:
        return self.decoder.d_model

    @property
    def num_decoder_layers(self) -> int:
        return len(self.decoder.layers)

    @property
    def query_anchors(self) -> Optional[Tensor]:
        """(num_queries, 4) the learned anchors, cxcywh in [0, 1]; None for two-stage models,
        whose anchors are per image (``DETREncoded.anchors``, or :meth:`detection_anchors`)."""
        if self.query_anchor_logits is None:
            return None
        return self.query_anchor_logits.sigmoid()

    # ---------------------------------------------------------------- stages

    def preprocess_image(self, batched_inputs: List[Dict[str, Tensor]]) -> ImageList:
        """Normalise and pad the input images."""
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        return ImageList.from_tensors(images, self.size_divisibility)

    def encode(self, batched_inputs: List[Dict[str, Tensor]]) -> DETREncoded:
        """Everything up to the decoder, for a batch in detectron2's input format.

        Args:
            batched_inputs: dicts with "image" (C, H, W) in ``input_format``, 0-255.
        """
        return self.encode_images(self.preprocess_image(batched_inputs))

    def encode_images(self, images: ImageList) -> DETREncoded:
        """Backbone, then :meth:`encode_features`.

        Args:
            images: normalised images, padded to a multiple of ``size_divisibility``.
        """
        return self.encode_features(self.backbone(images.tensor), images)

    def encode_features(self, features: Dict[str, Tensor], images: ImageList) -> DETREncoded:
        """Input projection, encoder and (two-stage) query selection on backbone features.

        Everything from here on sees the padding only through masks. (The backbone cannot: its
        convolutions carry border features into the padding and back, as in any CNN detector.)

        Args:
            features: backbone outputs by name, including ``in_features``.
            images: the batch they were computed from (its padded size and image sizes).
        """
        maps, masks = self.input_proj(
            [features[f] for f in self.in_features],
            images.image_sizes,
            tuple(images.tensor.shape[-2:]),
        )
        encoded = self.encoder(maps, masks, images.image_sizes)
        encoded = encoded.replace(images=images, features=features)
        if self.query_selection is not None:
            encoded = self.query_selection(encoded)
        return encoded

    def detection_anchors(self, encoded: DETREncoded) -> Tensor:
        """(B, N, 4) the anchors of the detection queries for this batch, cxcywh in [0, 1]."""
        if encoded.anchors is not None:
            return encoded.anchors
        return self.query_anchors[None].expand(encoded.batch_size, -1, -1)

    def anchors_to_queries(self, anchors: Tensor) -> Tensor:
        """The model's anchor-to-query encoding: MLP(sine embedding of the box).

        Args:
            anchors: (..., 4) cxcywh boxes in [0, 1], from any source.

        Returns:
            (..., D) positional queries, as the first decoder layer sees them.
        """
        return self.decoder.anchors_to_queries(anchors)

    def detect(
        self, encoded: DETREncoded, targets: Optional[List[Dict[str, Tensor]]] = None
    ) -> DETRDetections:
        """Decode the detection queries (with denoising queries when training with targets).

        Args:
            encoded: from :meth:`encode`.
            targets: from :meth:`prepare_targets`; needed for denoising only.
        """
        anchors = self.detection_anchors(encoded)
        content = self.query_content.weight[None].expand(encoded.batch_size, -1, -1)
        dn = None
        if self.training and self.denoising is not None and targets is not None:
            dn = self.denoising(targets)
        if dn is None:
            out = self.decoder(content, anchors, encoded)
            return DETRDetections(
                queries=out,
                proposal_logits=encoded.proposal_logits,
                proposal_boxes=encoded.proposal_boxes,
            )
        dn_content, dn_anchors, valid, meta = dn
        mask = self.denoising.attention_mask(meta, valid, anchors.shape[1])
        out = self.decoder(
            torch.cat([dn_content, content], 1), torch.cat([dn_anchors, anchors], 1), encoded, mask
        )
        split = meta.num_queries
        return DETRDetections(
            queries=out.select(slice(split, None)),
            denoising=out.select(slice(0, split)),
            denoising_meta=meta,
            proposal_logits=encoded.proposal_logits,
            proposal_boxes=encoded.proposal_boxes,
        )

    def decode_groups(
        self, encoded: DETREncoded, groups: Sequence[QueryGroup]
    ) -> List[DecoderOutput]:
        """Decode query groups over the encoder memory, isolated from each other and from the
        detection and denoising queries.

        All groups run in one decoder pass with a block-diagonal self-attention mask: attention to
        the memory is per query, so blocking self-attention across groups isolates them exactly,
        and one pass over all groups costs less than one pass per group. Detection and denoising
        queries are not part of the pass at all.

        Args:
            encoded: from :meth:`encode` (the same memory the detection queries use).
            groups: each with anchors (B, M_g, 4) cxcywh in [0, 1] of each image, and content
                (B, M_g, D) or None for zeros.

        Returns:
            One :class:`DecoderOutput` per group: logits (L, B, M_g, K), boxes (L, B, M_g, 4).
        """
        if not groups:
            return []
        batch, dim = encoded.batch_size, self.hidden_dim
        contents, anchors, sizes = [], [], []
        for i, group in enumerate(groups):
            a = group.anchors
            if a.dim() != 3 or a.shape[0] != batch or a.shape[2] != 4:
                raise ValueError(
                    f"group {i}: anchors must be ({batch}, M, 4), got {tuple(a.shape)}"
                )
            c = group.content
            if c is None:
                c = encoded.memory.new_zeros(batch, a.shape[1], dim)
            elif c.shape != (batch, a.shape[1], dim):
                raise ValueError(
                    f"group {i}: content must be ({batch}, {a.shape[1]}, {dim}), "
                    f"got {tuple(c.shape)}"
                )
            contents.append(c)
            anchors.append(a.to(encoded.memory.dtype).clamp(0.0, 1.0))
            sizes.append(a.shape[1])
        mask = block_diagonal_mask(sizes, encoded.memory.device) if len(groups) > 1 else None
        out = self.decoder(torch.cat(contents, 1), torch.cat(anchors, 1), encoded, mask)
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        return [out.select(slice(s, e)) for s, e in zip(starts[:-1], starts[1:])]

    # ---------------------------------------------------------------- training / inference

    def prepare_targets(self, batched_inputs: List[Dict]) -> List[Dict[str, Tensor]]:
        """GT ``Instances`` -> ``{"labels": (T,), "boxes": (T, 4) cxcywh normalised}`` per image."""
        targets = []
        for x in batched_inputs:
            instances = x["instances"].to(self.device)
            h, w = instances.image_size
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_xyxy_to_cxcywh(instances.gt_boxes.tensor / scale)
            targets.append({"labels": instances.gt_classes, "boxes": boxes})
        return targets

    def losses(
        self, detections: DETRDetections, targets: List[Dict[str, Tensor]]
    ) -> Dict[str, Tensor]:
        """The weighted detection losses (see :class:`SetCriterion` for the names)."""
        losses = self.criterion(detections, targets)
        if self.training and self.denoising is not None and detections.denoising is None:
            # A batch without GT boxes has no denoising queries. Report zeros under the same names,
            # tied to the label embedding so that DDP sees every parameter used.
            zero = self.denoising.label_embed.weight.sum() * 0.0
            for name in [k for k in losses if not k.endswith("_enc")]:
                base = "_".join(name.split("_")[:2])  # loss_class_3 -> loss_class
                losses[base + "_dn" + name[len(base) :]] = zero
        return losses

    def inference(
        self, detections: DETRDetections, image_sizes: List[Tuple[int, int]]
    ) -> List[Instances]:
        """Top-k (query, class) pairs by sigmoid score, as in Deformable DETR.

        Returns:
            Per image, ``Instances`` in the input image's frame with ``pred_boxes``, ``scores``
            and ``pred_classes``.
        """
        logits = detections.queries.pred_logits
        boxes = detections.queries.pred_boxes
        batch, num_queries, num_classes = logits.shape
        k = min(self.detections_per_image, num_queries * num_classes)
        scores, index = logits.sigmoid().flatten(1).topk(k, dim=1)
        query = torch.div(index, num_classes, rounding_mode="floor")
        labels = index % num_classes
        boxes = box_cxcywh_to_xyxy(boxes.gather(1, query[..., None].expand(-1, -1, 4)))
        results = []
        for b, (h, w) in enumerate(image_sizes):
            scale = boxes.new_tensor([w, h, w, h])
            result = Instances((h, w))
            result.pred_boxes = Boxes(boxes[b] * scale)
            result.scores = scores[b]
            result.pred_classes = labels[b]
            results.append(result)
        return results

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: detectron2's list of dicts: "image" (C, H, W); in training
                "instances" with ``gt_boxes`` and ``gt_classes``; optionally "height"/"width",
                the output resolution.

        Returns:
            Training: the dict of weighted losses. Inference: ``[{"instances": Instances}]``.
        """
        return self.forward_encoded(self.encode(batched_inputs), batched_inputs)

    def forward_encoded(self, encoded: DETREncoded, batched_inputs: List[Dict]):
        """``forward`` after :meth:`encode`: a distiller encodes once, then calls this for the
        detection path and :meth:`decode_groups` for its distillation points.

        Returns:
            As ``forward``.
        """
        if self.training:
            targets = self.prepare_targets(batched_inputs)
            return self.losses(self.detect(encoded, targets), targets)
        results = self.inference(self.detect(encoded), encoded.image_sizes)
        processed = []
        for result, x, size in zip(results, batched_inputs, encoded.image_sizes):
            height = x.get("height", size[0])
            width = x.get("width", size[1])
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed
