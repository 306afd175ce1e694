# Co-DINO close to the published Co-DETR "co_dino_5scale_r50" (mmdetection projects/CO-DETR,
# v3.3.0), for GPUs. Differences from the published config, all forced by LoRIS's setting:
#   * trained from scratch (no ImageNet weights may be downloaded): nothing frozen, BatchNorm
#     trains, backbone lr multiplier 1.0 instead of 0.1, and far more epochs than the 1x (12);
#   * one input channel (grayscale ultrasound) and one class (the recess);
#   * 256-px inputs (the pipeline's size) instead of 1024-px LSJ crops, so the RPN proposal
#     budget is scaled down with the image area;
#   * our own loop instead of mmengine's runner (single GPU; AdamW + cosine).
# Build with build_detector("codetr", **detectors.codetr.load_config(this_file)).

_embed = 256  # published
_ffn = 2048  # published
_levels = 5  # published "5scale": strides 4, 8, 16, 32 (+ one extra conv level, 64)
_layers = 6  # published encoder and decoder depth
_loss_lambda = 2.0  # published
_aux_w = _loss_lambda * _layers  # aux head losses scaled by lambda x decoder layers (= 12)
_strides = [4, 8, 16, 32, 64, 128]  # encoder levels + the extra stride-2 level (published)

image_size = 256
aux_heads = True
max_detections = 10
device = "auto"  # CUDA when present


def _max_iou(pos: float, neg: float, min_pos: float, low_quality: bool) -> dict:
    """mmdet's MaxIoUAssigner at these IoU thresholds (functions are left out of the parsed config)."""
    thresholds = dict(pos_iou_thr=pos, neg_iou_thr=neg, min_pos_iou=min_pos)
    return dict(type="MaxIoUAssigner", **thresholds, match_low_quality=low_quality, ignore_iof_thr=-1)


model = dict(
    type="LorisCoDINO",
    num_queries=900,  # published
    with_box_refine=True,
    as_two_stage=True,
    num_feature_levels=_levels,
    backbone=dict(
        type="ResNet",
        depth=50,
        in_channels=1,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_cfg=dict(type="BN", requires_grad=True),
        norm_eval=False,
        style="pytorch",
        init_cfg=None,
    ),
    neck=dict(
        type="ChannelMapper",
        in_channels=[256, 512, 1024, 2048],
        kernel_size=1,
        out_channels=_embed,
        act_cfg=None,
        norm_cfg=dict(type="GN", num_groups=32),
        num_outs=_levels,
    ),
    encoder=dict(
        num_layers=_layers,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=_embed, num_levels=_levels, dropout=0.0),
            ffn_cfg=dict(embed_dims=_embed, feedforward_channels=_ffn, ffn_drop=0.0),
        ),
    ),
    decoder=dict(
        num_layers=_layers,
        return_intermediate=True,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=_embed, num_heads=8),  # dropout defaults to 0
            cross_attn_cfg=dict(embed_dims=_embed, num_levels=_levels, dropout=0.0),
            ffn_cfg=dict(embed_dims=_embed, feedforward_channels=_ffn, ffn_drop=0.0),
        ),
        post_norm_cfg=None,
    ),
    positional_encoding=dict(num_feats=_embed // 2, normalize=True, offset=0.0, temperature=20),
    bbox_head=dict(
        type="LorisCoDINOHead",
        num_classes=1,
        embed_dims=_embed,
        sync_cls_avg_factor=True,
        loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_bbox=dict(type="L1Loss", loss_weight=5.0),
        loss_iou=dict(type="GIoULoss", loss_weight=2.0),
    ),
    dn_cfg=dict(
        label_noise_scale=0.5, box_noise_scale=1.0, group_cfg=dict(dynamic=True, num_groups=None, num_dn_queries=100)
    ),  # published
    train_cfg=dict(
        assigner=dict(
            type="HungarianAssigner",
            match_costs=[
                dict(type="FocalLossCost", weight=2.0),
                dict(type="BBoxL1Cost", weight=5.0, box_format="xywh"),
                dict(type="IoUCost", iou_mode="giou", weight=2.0),
            ],
        )
    ),
    # Published uses soft-NMS at 0.8 on the query head; with one object per image the top-k
    # of DINO's one-to-one queries is what LoRIS needs, so no NMS here.
    test_cfg=dict(max_per_img=max_detections),
    max_pos_queries=300,
    min_pos_queries=9,
    rpn_head=dict(
        type="RPNHead",
        in_channels=_embed,
        feat_channels=_embed,
        anchor_generator=dict(
            type="AnchorGenerator", octave_base_scale=4, scales_per_octave=3, ratios=[0.5, 1.0, 2.0], strides=_strides
        ),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0 * _aux_w),
        loss_bbox=dict(type="L1Loss", loss_weight=1.0 * _aux_w),
        train_cfg=dict(
            assigner=_max_iou(pos=0.7, neg=0.3, min_pos=0.3, low_quality=True),
            sampler=dict(type="RandomSampler", num=256, pos_fraction=0.5, neg_pos_ub=-1, add_gt_as_proposals=False),
            allowed_border=-1,
            pos_weight=-1,
            debug=False,
        ),
    ),
    # Published 4000 / 1000 at 1024 px; a 256-px image has 1/16 of the anchors.
    rpn_proposal=dict(nms_pre=1000, max_per_img=300, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
    roi_head=dict(
        type="LorisCoRoIHead",
        bbox_roi_extractor=dict(
            type="SingleRoIExtractor",
            roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
            out_channels=_embed,
            featmap_strides=_strides[:-1],
            finest_scale=56,
        ),
        bbox_head=dict(
            type="Shared2FCBBoxHead",
            in_channels=_embed,
            fc_out_channels=1024,
            roi_feat_size=7,
            num_classes=1,
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False,
            reg_decoded_bbox=True,
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0 * _aux_w),
            loss_bbox=dict(type="GIoULoss", loss_weight=10.0 * _aux_w),
        ),
        train_cfg=dict(
            assigner=_max_iou(pos=0.5, neg=0.5, min_pos=0.5, low_quality=False),
            sampler=dict(type="RandomSampler", num=512, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True),
            pos_weight=-1,
            debug=False,
        ),
    ),
    atss_head=dict(
        type="LorisCoATSSHead",
        num_classes=1,
        in_channels=_embed,
        stacked_convs=1,
        feat_channels=_embed,
        anchor_generator=dict(
            type="AnchorGenerator", ratios=[1.0], octave_base_scale=8, scales_per_octave=1, strides=_strides
        ),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
        loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0 * _aux_w),
        loss_bbox=dict(type="GIoULoss", loss_weight=2.0 * _aux_w),
        loss_centerness=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0 * _aux_w),
        train_cfg=dict(assigner=dict(type="ATSSAssigner", topk=9), allowed_border=-1, pos_weight=-1, debug=False),
    ),
)

train = dict(
    epochs=300,  # (int) the budget; from scratch on ~230 scans; the published 12 epochs assume ImageNet weights
    batch_size=16,  # published 8 GPUs x 2
    lr=2e-4,  # published
    weight_decay=1e-4,  # published
    backbone_lr_mult=1.0,  # published 0.1 (pretrained backbone)
    warmup_iters=200,
    min_lr_ratio=0.01,
    clip_grad=0.1,  # published
    seed=0,
    num_threads=None,
    max_minutes=None,  # (float|None) opt-in wall-clock cap, off: a binding cap makes results machine-dependent
    val_interval=10,
    hflip=True,
    intensity_jitter=0.1,
    scale_jitter=0.2,  # stands in for the published multi-scale resize + crop (LSJ); CPU default's value
    translate=0.1,
)
