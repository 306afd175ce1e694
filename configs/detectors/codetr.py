# Co-DINO (Co-DETR with a DINO query head), LoRIS CPU default: a fixed budget of 14 epochs per fold
# (a few minutes on one thread), so a command and seed give the same model on any machine.
#
# Used as build_detector("codetr", **detectors.codetr.load_config(this_file)). Names starting with
# "_" are helper constants and are not passed to the detector. Every size below was chosen by
# measuring on the phantom (docs/results.md); the published values are in codetr_paper.py.

_embed = 64  # transformer width (published: 256); 64 keeps a CPU step well under a second
_ffn = 4 * _embed  # FFN width, the usual 4x (published: 2048 = 8x)
_levels = 3  # feature levels, strides 8/16/32 (published: 5 levels, strides 4..64)
_enc_layers = 2  # published: 6
_dec_layers = 2  # published: 6
_queries = 30  # one recess per image; 30 leaves room for the two-stage top-k (published: 900)
_dn_queries = 10  # denoising queries (published: 100)
_loss_lambda = 2.0  # Co-DETR's auxiliary-loss factor (published: 2.0)
_aux_w = _loss_lambda * _dec_layers  # aux head losses are scaled by lambda x decoder layers
_strides = [8, 16, 32, 64]  # encoder levels + the extra stride-2 level the aux heads see

image_size = 128  # the model's input side; 256-px pipeline arrays are resized down
aux_heads = True  # False = plain DINO with the same budget (the ablation)
max_detections = 10  # boxes returned per image, best first


def _max_iou(pos: float, neg: float, min_pos: float, low_quality: bool) -> dict:
    """mmdet's MaxIoUAssigner at these IoU thresholds (functions are left out of the parsed config)."""
    thresholds = dict(pos_iou_thr=pos, neg_iou_thr=neg, min_pos_iou=min_pos)
    return dict(type="MaxIoUAssigner", **thresholds, match_low_quality=low_quality, ignore_iof_thr=-1)


model = dict(
    type="LorisCoDINO",
    num_queries=_queries,
    with_box_refine=True,
    as_two_stage=True,
    num_feature_levels=_levels,
    # ResNet-18 at half width (base 32 -> stages 32/64/128/256), one input channel (grayscale),
    # trained from scratch: nothing frozen, BatchNorm in training mode, no pretrained weights.
    backbone=dict(
        type="ResNet",
        depth=18,
        base_channels=32,
        in_channels=1,
        num_stages=4,
        out_indices=(1, 2, 3),
        frozen_stages=-1,
        norm_cfg=dict(type="BN", requires_grad=True),
        norm_eval=False,
        style="pytorch",
        init_cfg=None,
    ),
    neck=dict(
        type="ChannelMapper",
        in_channels=[64, 128, 256],
        kernel_size=1,
        out_channels=_embed,
        act_cfg=None,
        norm_cfg=dict(type="GN", num_groups=32),
        num_outs=_levels,
    ),
    encoder=dict(
        num_layers=_enc_layers,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=_embed, num_levels=_levels, dropout=0.0),
            ffn_cfg=dict(embed_dims=_embed, feedforward_channels=_ffn, ffn_drop=0.0),
        ),
    ),
    decoder=dict(
        num_layers=_dec_layers,
        return_intermediate=True,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=_embed, num_heads=8),  # dropout defaults to 0
            cross_attn_cfg=dict(embed_dims=_embed, num_levels=_levels, dropout=0.0),
            ffn_cfg=dict(embed_dims=_embed, feedforward_channels=_ffn, ffn_drop=0.0),
        ),
        post_norm_cfg=None,
    ),
    # num_feats must be embed/2 (mmdet's defaults assume 256).
    positional_encoding=dict(num_feats=_embed // 2, normalize=True, offset=0.0, temperature=20),
    bbox_head=dict(
        type="LorisCoDINOHead",
        num_classes=1,
        embed_dims=_embed,  # the head's default is 256
        sync_cls_avg_factor=True,
        # Co-DINO uses quality focal loss where DINO uses focal loss.
        loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_bbox=dict(type="L1Loss", loss_weight=5.0),
        loss_iou=dict(type="GIoULoss", loss_weight=2.0),
    ),
    dn_cfg=dict(
        label_noise_scale=0.5,
        box_noise_scale=1.0,
        group_cfg=dict(dynamic=True, num_groups=None, num_dn_queries=_dn_queries),
    ),
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
    test_cfg=dict(max_per_img=max_detections),
    max_pos_queries=300,  # Co-DETR's cap per image and head; never reached with one recess
    min_pos_queries=9,  # Co-DETR's floor; the rest are background queries
    # ---- auxiliary one-to-many branch 1: Faster R-CNN (RPN + RoI head)
    rpn_head=dict(
        type="RPNHead",
        in_channels=_embed,
        feat_channels=_embed,
        anchor_generator=dict(
            type="AnchorGenerator",
            octave_base_scale=4,
            scales_per_octave=2,
            # h/w ratios: recess boxes are wide and flat (phantom h/w 0.2-0.6, median 0.3).
            ratios=[0.25, 0.5, 1.0],
            strides=_strides,
        ),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0 * _aux_w),
        loss_bbox=dict(type="L1Loss", loss_weight=1.0 * _aux_w),
        train_cfg=dict(
            assigner=_max_iou(pos=0.7, neg=0.3, min_pos=0.3, low_quality=True),
            # 64 sampled anchors (published 256): one object per image needs few.
            sampler=dict(type="RandomSampler", num=64, pos_fraction=0.5, neg_pos_ub=-1, add_gt_as_proposals=False),
            allowed_border=-1,
            pos_weight=-1,
            debug=False,
        ),
    ),
    rpn_proposal=dict(
        nms_pre=500, max_per_img=100, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0
    ),  # published: 4000 / 1000 for 1024-px images
    roi_head=dict(
        type="LorisCoRoIHead",
        bbox_roi_extractor=dict(
            type="SingleRoIExtractor",
            roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
            out_channels=_embed,
            featmap_strides=_strides,
            finest_scale=56,
        ),
        bbox_head=dict(
            type="Shared2FCBBoxHead",
            in_channels=_embed,
            fc_out_channels=256,  # published 1024
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
            sampler=dict(
                type="RandomSampler", num=128, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True
            ),  # published: 512
            pos_weight=-1,
            debug=False,
        ),
    ),
    # ---- auxiliary one-to-many branch 2: ATSS
    atss_head=dict(
        type="LorisCoATSSHead",
        num_classes=1,
        in_channels=_embed,
        stacked_convs=1,
        feat_channels=_embed,
        anchor_generator=dict(
            type="AnchorGenerator",
            ratios=[1.0],
            octave_base_scale=4,  # published 8 (1024 px)
            scales_per_octave=1,
            strides=_strides,
        ),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
        loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0 * _aux_w),
        loss_bbox=dict(type="GIoULoss", loss_weight=2.0 * _aux_w),
        loss_centerness=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0 * _aux_w),
        train_cfg=dict(assigner=dict(type="ATSSAssigner", topk=9), allowed_border=-1, pos_weight=-1, debug=False),
    ),
)

train = dict(
    epochs=14,  # (int) the training budget: ~390 steps of 8 on a fold's normal scans, a few CPU minutes
    batch_size=8,
    lr=4e-4,  # AdamW; 2x the published 2e-4 because the run is short and from scratch
    weight_decay=1e-4,
    backbone_lr_mult=1.0,  # published 0.1 is for an ImageNet backbone; ours starts from scratch
    warmup_iters=50,
    min_lr_ratio=0.01,
    clip_grad=0.1,  # published
    seed=0,
    num_threads=1,  # (int) torch threads while training: a fixed count keeps the numbers machine-independent
    max_minutes=None,  # (float|None) opt-in wall-clock cap, off: one that binds ties the model to the machine
    val_interval=5,
    hflip=True,
    intensity_jitter=0.1,
    scale_jitter=0.2,  # zoom 0.8-1.2x: without geometric jitter the model overfits a fold's few hundred scans
    translate=0.1,  # shift by up to 10% of the side: the recess position varies between patients
)
