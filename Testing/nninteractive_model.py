"""A tiny nnInteractive model folder with hand-set weights, for tests against the real server on CPU.

The folder has the layout `nninteractive-server --model-dir DIR --fold 0` loads (nnInteractive 2.6).
The network is a norm-free two-stage PlainConvUNet whose weights make, per voxel,

    foreground  <=>  previous segmentation + positive prompt channels - 2 x negative ones > 0.5

so a point gives a small ball centred exactly on its voxel, a negative point erases it and a box
fills exactly its voxels: deterministic, fast (0.1-0.2 s a prompt) and exact enough to catch axis
order and RAS mistakes. Random weights would make CPU predictions take minutes and vary.
Input channels: 0 image, 1 previous segmentation, 2/3 box+lasso +/-, 4/5 point +/-, 6/7 scribble +/-.
Prompts longer than about 43 voxels on an axis make the server refine patch by patch; tests keep
prompts smaller than that where they assert exact voxels.

The folder reports the capabilities the server gives the official nnInteractive v1.0 weights
(their legacy metadata: points, 2D boxes, scribbles, lassos, an initial segment; no 3D boxes), so
a client that sends what the official model refuses fails here too. A slow variant (delay_s) waits
in every forward pass, like a large structure on a busy GPU; with image_weight the image votes too, so
bright voxels grow (a long vessel the model follows past its prompt); an out_of_memory variant fails
every forward pass as CUDA does when the GPU's memory runs out.
"""

import json
import time
from pathlib import Path

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

CONFIGURATION = "3d_fullres"
# nnInteractive.trainer ships this class, so the server finds it without scanning nnU-Net.
TRAINER_NAME = "nnInteractiveTrainer_stub"

# Indices into the *interaction* tensor (network input index = 1 + this).
CHANNEL_MAPPING = {
    "prev_seg": 0,
    "bbox2d": [1, 2],
    "bbox3d": [1, 2],
    "lasso": [1, 2],
    "points": [3, 4],
    "scribble": [5, 6],
}
NUM_IMAGE_CHANNELS = 1
# inference_info "interaction_channels" excludes prev_seg: the session uses value + 1.
NUM_INTERACTION_CHANNELS_WITHOUT_PREV_SEG = 6
NUM_INPUT_CHANNELS = NUM_IMAGE_CHANNELS + NUM_INTERACTION_CHANNELS_WITHOUT_PREV_SEG + 1  # 8

FEATURES = [4, 8]
BG_LOGIT = 0.5
NEG_WEIGHT = -2.0


# What nnInteractiveInferenceSession._legacy_default_capability() gives the official v1.0 weights.
OFFICIAL_SUPPORTED_INTERACTIONS = {"scribble": True, "lasso": True, "points": True, "bbox2d": True, "bbox3d": False}


class SlowPlainConvUNet(PlainConvUNet):
    """The same network, delay_s slower per forward pass. The server imports it by name from plans.json
    (this folder is on its PYTHONPATH)."""

    def __init__(self, *args, delay_s: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay_s = delay_s

    def forward(self, x):
        time.sleep(self.delay_s)
        return super().forward(x)


class OutOfMemoryPlainConvUNet(PlainConvUNet):
    """The same network, failing every forward pass after the first passes_before_failing with the error torch raises
    when a GPU's memory runs out (as a larger region's prediction does after a smaller one's fitted)."""

    def __init__(self, *args, passes_before_failing: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.passes_left = passes_before_failing

    def forward(self, x):
        self.passes_left -= 1
        if self.passes_left >= 0:
            return super().forward(x)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.25 GiB. GPU 0 has a total capacity of "
                                     "15.69 GiB of which 1.02 GiB is free.")


def _arch_block(delay_s: float = 0.0, out_of_memory: bool = False, passes_before_failing: int = 0) -> dict:
    block = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 2,
            "features_per_stage": list(FEATURES),
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3], [3, 3, 3]],
            "strides": [[1, 1, 1], [2, 2, 2]],
            "n_conv_per_stage": [1, 1],
            "n_conv_per_stage_decoder": [1],
            "conv_bias": True,
            "norm_op": None,
            "norm_op_kwargs": None,
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    if delay_s:
        block["network_class_name"] = "nninteractive_model.SlowPlainConvUNet"
        block["arch_kwargs"]["delay_s"] = delay_s
    if out_of_memory:
        block["network_class_name"] = "nninteractive_model.OutOfMemoryPlainConvUNet"
        block["arch_kwargs"]["passes_before_failing"] = passes_before_failing
    return block


def _official_arch_block() -> dict:
    """The official v1.0 weights' architecture (notes/nninteractive-official-model.md): ResEnc-L U-Net,
    6 stages of 32...320 features, 1,3,4,6,6,6 residual blocks, instance norm; 102 M parameters."""
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
        "arch_kwargs": {
            "n_stages": 6,
            "features_per_stage": [32, 64, 128, 256, 320, 320],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * 6,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
            "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
            "n_conv_per_stage_decoder": [1] * 5,
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


@torch.no_grad()
def _random_official_state_dict(predicts_nothing: bool = False) -> dict:
    """Untrained (randomly initialised) weights of the official architecture: real GPU timings, no real masks.
    predicts_nothing: the output layer always says background, so each prompt is one network pass (the time
    of a small structure) instead of random foreground that sets off autozoom."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    kw = dict(_official_arch_block()["arch_kwargs"])
    kw.update(conv_op=torch.nn.Conv3d, norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU)
    net = ResidualEncoderUNet(input_channels=NUM_INPUT_CHANNELS, num_classes=2, deep_supervision=False, **kw)
    if predicts_nothing:
        output = net.decoder.seg_layers[-1]
        output.weight.zero_()
        output.bias.copy_(torch.tensor([5.0, -5.0]))
    return net.state_dict()


def build_network():
    """Instantiate the architecture described by plans.json (same class and kwargs)."""
    kw = dict(_arch_block()["arch_kwargs"])
    kw["conv_op"] = torch.nn.Conv3d
    kw["nonlin"] = torch.nn.LeakyReLU
    return PlainConvUNet(input_channels=NUM_INPUT_CHANNELS, num_classes=2, deep_supervision=False, **kw)


def _input_weights() -> dict[int, float]:
    """Network-input channel index -> weight of its centre tap in the first conv."""
    w = {NUM_IMAGE_CHANNELS + CHANNEL_MAPPING["prev_seg"]: 1.0}
    for key, value in CHANNEL_MAPPING.items():
        if key == "prev_seg":
            continue
        pos, neg = value
        # Several prompt kinds share channels (bbox2d/bbox3d/lasso); set each channel once.
        w[NUM_IMAGE_CHANNELS + pos] = 1.0
        w[NUM_IMAGE_CHANNELS + neg] = NEG_WEIGHT
    return w


@torch.no_grad()
def make_state_dict(image_weight: float = 0.0) -> dict:
    net = build_network()
    for p in net.parameters():
        p.zero_()

    first = net.encoder.stages[0][0].convs[0].conv  # Conv3d(8 -> F0, k3, s1, pad 1)
    for ch, weight in {0: image_weight, **_input_weights()}.items():  # set on the module: all its aliases follow
        first.weight[0, ch, 1, 1, 1] = weight

    dec = net.decoder.stages[0].convs[0].conv  # Conv3d(2*F0 -> F0): input = cat(upsampled, skip)
    dec.weight[0, FEATURES[0] + 0, 1, 1, 1] = 1.0  # copy skip feature 0

    seg = net.decoder.seg_layers[-1]  # Conv3d(F0 -> 2, k1)
    seg.weight[1, 0, 0, 0, 0] = 1.0
    seg.bias[0] = BG_LOGIT
    return {k: v.clone() for k, v in net.state_dict().items()}


def write_model_folder(
    folder: Path,
    patch_size: int = 64,
    point_radius: int = 4,
    interaction_decay: float = 0.98,
    license_line: str = "Apache-2.0 (synthetic test model)",
    delay_s: float = 0.0,
    official_architecture: bool = False,
    predicts_nothing: bool = False,
    image_weight: float = 0.0,
    out_of_memory: bool = False,
    passes_before_failing: int = 0,
    initial_label: bool = True,
) -> Path:
    """Write the model folder and return its path. patch_size must be >= 64 in practice
    (the server's refinement margin is 24 voxels per side) and divisible by 2. delay_s > 0 makes
    every forward pass that much slower. official_architecture: the official weights' network and
    192^3 patch with random weights instead (GPU timing runs: benchmarks/gpu_server.py), predicts_nothing:
    with an output layer that always says background. image_weight: the (z-scored) image's vote: at 0.3,
    voxels more than 1.7 standard deviations above the image's mean are foreground wherever the model
    looks. out_of_memory: every prediction fails as on a GPU whose memory ran out (after passes_before_failing
    forward passes that work). initial_label: whether it reports taking a segment's voxels to start from (the
    official weights do; a custom model may not)."""
    folder = Path(folder)
    if official_architecture:
        patch_size = 192
    if patch_size % 2:
        raise ValueError("patch_size must be even (one stride-2 stage)")
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)

    inference_info = {
        "inference_class": "nnInteractiveInferenceSession",
        "point_radius": point_radius,
        "preferred_scribble_thickness": [2, 2, 2],
        "interaction_decay": interaction_decay,
        "pad_mode_image": "constant",
        "supported_interactions": OFFICIAL_SUPPORTED_INTERACTIONS,
        "supports_initial_label": initial_label,
        "supports_zero_shot_label_refinement": True,
        "interaction_channels": NUM_INTERACTION_CHANNELS_WITHOUT_PREV_SEG,
        "channel_mapping": CHANNEL_MAPPING,
    }
    dataset = {
        "channel_names": {"0": "image"},
        "labels": {"background": 0, "foreground": 1},
        "numTraining": 0,
        "file_ending": ".nii.gz",
    }
    plans = {
        "dataset_name": "Dataset999_EchoTest",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [patch_size] * 3,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            CONFIGURATION: {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 1,
                "patch_size": [patch_size] * 3,
                "median_image_size_in_voxels": [patch_size] * 3,
                "spacing": [1.0, 1.0, 1.0],
                "normalization_schemes": ["ZScoreNormalization"],
                "use_mask_for_norm": [False],
                "architecture": (_official_arch_block() if official_architecture
                                 else _arch_block(delay_s, out_of_memory, passes_before_failing)),
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "synthetic",
        "foreground_intensity_properties_per_channel": {},
    }
    (folder / "inference_info.json").write_text(json.dumps(inference_info, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "LICENSE").write_text(license_line + "\n")
    checkpoint = {
        "network_weights": (_random_official_state_dict(predicts_nothing) if official_architecture
                            else make_state_dict(image_weight)),
        "trainer_name": TRAINER_NAME,
        "init_args": {"configuration": CONFIGURATION, "fold": 0, "plans": plans, "dataset_json": dataset},
    }
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder
