"""networks.lilora against its definition (U_aux U_train D_train D_aux), kohya's LoRA, diffusers' loader and itself."""

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from torch import nn

from library.training.network_protocol import TrainableNetwork
from networks import lilora, lilora_file, lora
from networks.base import NetworkWeightsError
from networks.lora_file import load_lora_file, save_lora_file
from networks.network_args import NetworkArgsError, NetworkError
from tests.networks.helpers import assert_outputs_close, fresh, outputs
from tests.networks.tolerances import assert_close

REPO = Path(__file__).resolve().parents[2]
SMALL_AUX = {"aux_down": "16", "aux_up": "8"}  # narrower than every tiny layer: the aux bases are proper subspaces
INITS = ("up_zero", "down_zero", "joint")


def perturb(network, seed=0):
    """Move every core off its init (one factor starts at zero, which would make every check trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.1)
    return network


def definition_delta(module):
    """ΔW in float64 from the paper's factorisation: alpha/r · U_aux (U_train D_train | C) D_aux."""
    down_aux, up_aux = module.down_aux.double(), module.up_aux.double()
    if module.init == "joint":
        inner = module.lilora_core.double()
    else:
        inner = module.lilora_up.double() @ module.lilora_down.double()
    delta = up_aux @ inner @ down_aux * (module.alpha.double() / module.lora_dim)
    return delta.view(module.original.weight.shape)


def apply_weight(layer, x, weight):
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight)
    return F.conv2d(x, weight, None, layer.stride, layer.padding)


LAYERS = {
    "linear": (lambda: nn.Linear(40, 24), (2, 5, 40)),
    "conv1x1": (lambda: nn.Conv2d(24, 20, 1), (2, 24, 5, 5)),
    "conv3x3": (lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 6, 6)),
    "downsampler": (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1), (2, 8, 7, 7)),
}


def make_module(layer, init, rank=3, alpha=2.0, **kwargs):
    return lilora.LiLoRAModule("lora_unet_x", layer, rank, alpha, aux_down=16, aux_up=10, init=init, **kwargs)


# ---- the math ----


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("kind", LAYERS)
def test_forward_equals_the_multiplied_out_lora_and_the_merged_weight(kind, init):
    make, shape = LAYERS[kind]
    layer, x = make().double(), torch.randn(shape, dtype=torch.float64)
    module = perturb(make_module(layer, init).double())
    if init == "joint":  # a core of rank <= r, so that the rank-r file is exact
        with torch.no_grad():
            b, a = module.lilora_core.shape
            module.lilora_core.copy_(torch.randn(b, 3, dtype=torch.float64) @ torch.randn(3, a, dtype=torch.float64))
    as_lora = lora.LoRAModule("lora_unet_x", copy.deepcopy(layer), 3, 2.0).double()
    down, up = module.standard_factors()
    as_lora.load_state_dict({"lora_down.weight": down, "lora_up.weight": up, "alpha": module.alpha})
    as_lora.apply()
    base = layer(x)
    module.apply()
    adapted = layer(x)

    assert_close(adapted, base + apply_weight(layer, x, definition_delta(module)))
    assert not torch.allclose(adapted, base)
    assert_close(as_lora.original(x), adapted)
    module.restore()
    assert torch.equal(layer(x), base)
    module.merge_()
    assert_close(layer(x), adapted)


def test_joint_export_is_the_best_rank_r_approximation_with_balanced_factors():
    layer = nn.Linear(40, 24).double()
    module = perturb(make_module(layer, "joint").double())  # a full-rank 10 x 16 core
    down, up = module.standard_factors()
    dense = definition_delta(module).flatten(1)
    u, s, vh = torch.linalg.svd(dense)  # Eckart-Young, on the dense ΔW
    best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    assert_close((up @ down * module.scale).float(), best.float())  # float32 aux: orthonormal to float32 precision
    assert_close(up.norm(dim=0).float(), down.norm(dim=1).float())  # singular values shared evenly


@pytest.mark.parametrize("kind", LAYERS)
def test_aux_bases_are_orthonormal_and_clamped_to_the_layer(kind):
    layer = LAYERS[kind][0]()
    module = lilora.LiLoRAModule("lora_unet_x", layer, 2, 1.0, aux_down=100, aux_up=16)
    out, fan_in = layer.weight.shape[0], layer.weight[0].numel()
    assert module.aux_dims == (min(100, fan_in), min(16, out))
    down_aux, up_aux = module.down_aux.double(), module.up_aux.double()
    assert down_aux.shape == (min(100, fan_in), fan_in) and up_aux.shape == (out, min(16, out))
    assert (down_aux @ down_aux.T - torch.eye(down_aux.shape[0], dtype=torch.float64)).abs().max() < 1e-6
    assert (up_aux.T @ up_aux - torch.eye(up_aux.shape[1], dtype=torch.float64)).abs().max() < 1e-6
    assert module.down_aux.dtype == module.up_aux.dtype == torch.float32


def zero_factor(module):
    return getattr(module, {"up_zero": "lilora_up", "down_zero": "lilora_down", "joint": "lilora_core"}[module.init])


@pytest.mark.parametrize("init", INITS)
def test_each_init_starts_at_a_zero_delta_whose_zero_factor_gets_a_gradient(init):
    layer, x = nn.Linear(40, 24), torch.randn(6, 40)
    module = make_module(layer, init)
    assert not module.delta_weight().any() and not zero_factor(module).any()
    module.apply()
    layer(x).square().sum().backward()
    assert zero_factor(module).grad.abs().sum() > 0
    if init != "joint":
        trained, width = (module.lilora_down, 16) if init == "up_zero" else (module.lilora_up, 10)
        assert 0 < trained.abs().max() <= width**-0.5  # kohya's kaiming-uniform bound, on the aux side


def test_both_factors_at_zero_get_no_gradient():
    """Why init=both_zero is refused: each factor's gradient is a product with the other."""
    layer, x = nn.Linear(40, 24), torch.randn(6, 40)
    module = make_module(layer, "up_zero")
    with torch.no_grad():
        module.lilora_down.zero_()
    module.apply()
    layer(x).square().sum().backward()
    assert not module.lilora_down.grad.any() and not module.lilora_up.grad.any()


def test_both_zero_is_refused_with_the_reason():
    with pytest.raises(NetworkArgsError, match="init=both_zero cannot train: the gradient of each"):
        lilora.create_network(1.0, 4, 1, None, None, None, init="both_zero")


# ---- determinism ----

SD_SHAPES = [
    ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", (1280, 1280)),
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2", (640, 2560)),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj", (2560, 320)),
    ("lora_unet_down_blocks_0_resnets_0_conv1", (320, 320, 3, 3)),
]


def sd_aux(seed=0):
    return [lilora_file.aux_matrices(seed, name, shape, 100, 50) for name, shape in SD_SHAPES]


def test_aux_bits_do_not_depend_on_the_thread_count():
    one_thread = sd_aux()
    torch.set_num_threads(2)  # the autouse fixture restores the count
    for (down, up), (down_1, up_1) in zip(sd_aux(), one_thread):
        assert torch.equal(down, down_1) and torch.equal(up, up_1)


def test_aux_bits_do_not_depend_on_the_default_dtype():
    reference = sd_aux()[0]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert all(torch.equal(a, b) for a, b in zip(sd_aux()[0], reference))
    finally:
        torch.set_default_dtype(default)


def test_aux_bits_are_the_same_in_another_process():
    script = (
        "import sys, json; from networks import lilora_file as f; shapes = json.loads(sys.argv[1]);"
        "print(json.dumps([f.aux_digest(n, *f.aux_matrices(0, n, s, 100, 50)) for n, s in shapes]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(SD_SHAPES)], cwd=REPO, capture_output=True, text=True, check=True
    )
    here = [lilora_file.aux_digest(name, *aux) for (name, _), aux in zip(SD_SHAPES, sd_aux())]
    assert json.loads(result.stdout.splitlines()[-1]) == here
    assert lilora_file.aux_digest(SD_SHAPES[0][0], *sd_aux(seed=1)[0]) != here[0]  # the seed matters


def test_building_a_network_leaves_the_global_rng_alone(sd1):
    state = torch.get_rng_state()
    first = lilora.create_network(1.0, 4, 1, None, *fresh(sd1))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(1234)  # another global seed gives the same network: it is a pure function of aux_seed
    second = lilora.create_network(1.0, 4, 1, None, *fresh(sd1))
    tensors = lambda network: dict(network.named_parameters()) | dict(network.named_buffers())  # noqa: E731
    assert all(torch.equal(value, tensors(second)[key]) for key, value in tensors(first).items())
    assert first.fingerprint() == second.fingerprint()
    assert first.fingerprint() != lilora.create_network(1.0, 4, 1, None, *fresh(sd1), aux_seed="7").fingerprint()


# ---- the network ----


@pytest.mark.parametrize("init", INITS)
def test_trainable_parameters_stop_depending_on_the_layer_width(sd1, init):
    text_encoder, unet = fresh(sd1)
    network = lilora.create_network(1.0, 4, 1, None, text_encoder, unet, init=init, conv_dim="2", **SMALL_AUX)
    as_lora = lora.create_network(1.0, 4, 1, None, text_encoder, unet, conv_dim="2")  # the same layers
    assert [m.lora_name for m in network.adapters] == [m.lora_name for m in as_lora.adapters]
    expected = 0
    for module in as_lora.adapters:
        rank, fan_in, out = module.lora_dim, module.lora_down.weight[0].numel(), module.lora_up.weight.shape[0]
        a, b = min(16, fan_in), min(8, out)
        expected += a * b if init == "joint" else rank * (a + b)
    assert sum(p.numel() for p in network.get_trainable_params()) == expected


def test_network_implements_the_training_protocol(sd1):
    assert isinstance(lilora.create_network(1.0, 4, 1, None, *fresh(sd1)), TrainableNetwork)


def test_optimizer_groups_and_loraplus(sd1):
    network = lilora.create_network(1.0, 4, 1, None, *fresh(sd1), loraplus_lr_ratio="4")
    groups, names = network.prepare_optimizer_params(1e-5, 1e-4, None)
    assert names == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-5, 4e-5, 1e-4, 4e-4])
    assert {id(p) for p in groups[3]["params"]} == {id(m.lilora_up) for m in network.unet_loras}
    for bad in ({"loraplus_lr_ratio": "4"}, {"rank_dropout": "0.1"}):
        with pytest.raises(NetworkArgsError, match="init=joint"):
            lilora.create_network(1.0, 4, 1, None, *fresh(sd1), init="joint", **bad)


@pytest.mark.parametrize("init", INITS)
def test_max_norm_scales_each_delta_to_the_limit(sd1, init):
    network = perturb(lilora.create_network(1.0, 4, 2, None, *fresh(sd1), init=init, **SMALL_AUX))
    before = [definition_delta(m) for m in network.adapters]
    norms = [delta.norm().item() for delta in before]
    middle = len(norms) // 2
    limit = sum(sorted(norms)[middle : middle + 2]) / 2
    scaled, _, largest = network.apply_max_norm_regularization(limit, "cpu")
    assert scaled == sum(norm > limit for norm in norms) > 0 and largest == pytest.approx(limit, rel=1e-5)
    for module, delta, norm in zip(network.adapters, before, norms):  # float32 cores: float32 tolerance
        assert_close(definition_delta(module).float(), (delta * min(1.0, limit / norm)).float())


@pytest.mark.parametrize("args", [{"aux_down": "0"}, {"init": "orthogonal"}, {"aux_dwon": "10"}])
def test_bad_network_args_are_named(args):
    with pytest.raises(NetworkArgsError, match=next(iter(args))):
        lilora.create_network(1.0, 4, 1, None, None, None, **args)


# ---- files ----

KOHYA_KEY = re.compile(r"^lora_(unet|te)_\w+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def test_the_standard_file_is_a_kohya_lora_that_networks_lora_loads(sd1, tmp_path):
    ours, theirs = fresh(sd1), fresh(sd1)
    for _, unet in (ours, theirs):
        unet.to(torch.float64)  # see TOLERANCES: the tiny UNet amplifies float32 rounding
    network = perturb(lilora.create_network(1.0, 4, 2, None, *ours, conv_dim="2", **SMALL_AUX)).double()
    network.save_weights(tmp_path / "lilora.safetensors", None, {"ss_output_name": "x"})
    network.apply_to(*ours)
    tensors, metadata = load_lora_file(tmp_path / "lilora.safetensors")
    assert all(KOHYA_KEY.match(key) for key in tensors)
    assert tensors.keys() == lora.create_network(1.0, 4, 1, None, *theirs, conv_dim="2").state_dict().keys()
    assert metadata["ss_network_module"] == "networks.lilora" and metadata["ss_lilora_format"] == "standard"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_lilora_aux_fingerprint"] == network.fingerprint()

    as_lora, _ = lora.create_network_from_weights(1.0, tmp_path / "lilora.safetensors", None, *theirs)
    as_lora.double().apply_to(*theirs)
    as_lora.load_weights(tmp_path / "lilora.safetensors")
    assert_outputs_close(outputs(*theirs), outputs(*ours))


@pytest.mark.parametrize(
    "init, name, args",
    [
        ("up_zero", "x.lilora.safetensors", {}),
        ("down_zero", "x.lilora-000003.safetensors", {}),  # kohya's epoch file names
        ("joint", "x.safetensors", {"save_compact": "true"}),
    ],
)
def test_a_compact_file_restores_the_exact_cores(sd1, tmp_path, init, name, args):
    text_encoder, unet = fresh(sd1)
    network = perturb(lilora.create_network(1.0, 4, 2, None, text_encoder, unet, init=init, conv_dim="2", **args))
    network.save_weights(tmp_path / name, None, {})
    tensors, metadata = load_lora_file(tmp_path / name)
    assert metadata["ss_lilora_format"] == "compact"
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in network.parameters())

    rebuilt, weights = lilora.create_network_from_weights(1.0, tmp_path / name, None, text_encoder, unet)  # kohya
    rebuilt.load_state_dict(weights)
    resumed = lilora.create_network(1.0, 4, 2, None, text_encoder, unet, init=init, conv_dim="2")
    resumed.load_weights(tmp_path / name)  # --network_weights
    for again in (rebuilt, resumed):
        assert again.state_dict().keys() == network.state_dict().keys()
        assert all(torch.equal(again.state_dict()[k], v) for k, v in network.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("init", INITS)
def test_converting_a_compact_file_gives_the_standard_file(sd1, tmp_path, init, dtype):
    network = perturb(lilora.create_network(1.0, 4, 2, None, *fresh(sd1), init=init, conv_dim="2", **SMALL_AUX))
    network.save_weights(tmp_path / "x.safetensors", dtype, {"ss_output_name": "x"})
    network.save_weights(tmp_path / "x.lilora.safetensors", dtype, {"ss_output_name": "x"})
    standard, standard_metadata = load_lora_file(tmp_path / "x.safetensors")
    converted, converted_metadata = lilora_file.compact_to_standard(*load_lora_file(tmp_path / "x.lilora.safetensors"))
    assert converted.keys() == standard.keys()
    if dtype == torch.float32:  # the same products of the same cores
        assert all(torch.equal(converted[k], v) for k, v in standard.items())
        save_lora_file(tmp_path / "converted.safetensors", converted, converted_metadata)
        assert load_lora_file(tmp_path / "converted.safetensors")[1] == standard_metadata  # sshs hashes included
    else:  # the compact file rounded the cores, the standard file their products: compare the deltas
        assert all(converted[k].dtype == dtype for k in converted)
        for name in {key.partition(".")[0] for key in standard}:
            assert_close(file_delta(converted, name), file_delta(standard, name))


def file_delta(tensors, name):
    return tensors[f"{name}.lora_up.weight"].flatten(1) @ tensors[f"{name}.lora_down.weight"].flatten(1)


def rewrite(path, **metadata):
    tensors, old = load_lora_file(path)
    save_lora_file(path, tensors, {**old, **metadata})


def test_a_fingerprint_mismatch_is_refused(sd1, tmp_path):
    text_encoder, unet = fresh(sd1)
    path = tmp_path / "x.lilora.safetensors"
    lilora.create_network(1.0, 4, 2, None, text_encoder, unet).save_weights(path, None, {})
    rewrite(path, ss_lilora_aux_fingerprint="0" * 64)  # as if the aux had regenerated differently where trained
    message = rf"'{re.escape(str(path))}': the aux matrices regenerated here differ .*ss_lilora_aux_fingerprint"
    with pytest.raises(NetworkWeightsError, match=message):
        lilora.create_network_from_weights(1.0, path, None, text_encoder, unet)
    with pytest.raises(NetworkWeightsError, match=message):
        lilora.create_network(1.0, 4, 2, None, text_encoder, unet).load_weights(path)
    with pytest.raises(NetworkWeightsError, match=message):
        lilora_file.compact_to_standard(*load_lora_file(path), source=str(path))


def test_compact_files_need_the_same_aux_settings_and_algorithm(sd1, tmp_path):
    text_encoder, unet = fresh(sd1)
    path = tmp_path / "x.lilora.safetensors"
    lilora.create_network(1.0, 4, 2, None, text_encoder, unet, aux_seed="5").save_weights(path, None, {})
    with pytest.raises(NetworkWeightsError, match="trained with aux_seed=5.*--network_args aux_seed=5"):
        lilora.create_network(1.0, 4, 2, None, text_encoder, unet).load_weights(path)
    rebuilt, _ = lilora.create_network_from_weights(1.0, path, None, text_encoder, unet, aux_seed="9")
    assert rebuilt.args.aux_seed == 5  # the file's settings win
    rewrite(path, ss_lilora_aux_algorithm="2")
    with pytest.raises(NetworkWeightsError, match="aux algorithm 2"):
        lilora.create_network_from_weights(1.0, path, None, text_encoder, unet)


def test_a_compact_file_needs_safetensors(sd1, tmp_path):
    network = lilora.create_network(1.0, 4, 2, None, *fresh(sd1), save_compact="true")
    with pytest.raises(NetworkError, match="compact form: it needs safetensors metadata"):
        network.save_weights(tmp_path / "x.ckpt", None, {})
    assert not list(tmp_path.iterdir())


def test_a_full_compact_file_loads_into_a_unet_only_network(sd1, tmp_path):
    text_encoder, unet = fresh(sd1)
    full = perturb(lilora.create_network(1.0, 4, 2, None, text_encoder, unet, **SMALL_AUX))
    full.save_weights(tmp_path / "x.lilora.safetensors", None, {})
    unet_only = lilora.create_network(1.0, 4, 2, None, text_encoder, unet, **SMALL_AUX)
    unet_only.apply_to(text_encoder, unet, apply_text_encoder=False)  # --network_train_unet_only
    unet_only.load_weights(tmp_path / "x.lilora.safetensors")  # the text encoder's aux still verified
    assert all(torch.equal(full.state_dict()[k], v) for k, v in unet_only.state_dict().items())


# ---- resuming from a standard file ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_standard_file_resumes_by_projection_onto_the_aux_bases(sd1, tmp_path, dtype):
    text_encoder, unet = fresh(sd1)
    network = perturb(lilora.create_network(1.0, 4, 2, None, text_encoder, unet, **SMALL_AUX))
    network.save_weights(tmp_path / "x.safetensors", dtype, {})
    resumed = lilora.create_network(1.0, 4, 2, None, text_encoder, unet, **SMALL_AUX)
    resumed.load_weights(tmp_path / "x.safetensors")
    for key, value in network.state_dict().items():
        assert_close(resumed.state_dict()[key].to(dtype), value.to(dtype))


def test_a_standard_file_resumes_a_joint_network_as_its_rank_r_core(sd1, tmp_path):
    text_encoder, unet = fresh(sd1)
    network = perturb(lilora.create_network(1.0, 4, 2, None, text_encoder, unet, init="joint", **SMALL_AUX))
    network.save_weights(tmp_path / "x.safetensors", None, {})
    resumed, weights = lilora.create_network_from_weights(1.0, tmp_path / "x.safetensors", None, text_encoder, unet)
    resumed.load_state_dict(weights)
    assert resumed.args.init == "joint"
    originals = {module.lora_name: module for module in network.adapters}
    for module in resumed.adapters:
        u, s, vh = torch.linalg.svd(originals[module.lora_name].lilora_core.double())
        assert_close(module.lilora_core, (u[:, :4] @ torch.diag(s[:4]) @ vh[:4]).float())


def test_a_plain_lora_cannot_resume_a_lilora_network(sd1, tmp_path):
    text_encoder, unet = fresh(sd1)
    perturb(lora.create_network(1.0, 4, 2, None, text_encoder, unet)).save_weights(
        tmp_path / "lora.safetensors", None, {}
    )
    network = lilora.create_network(1.0, 4, 2, None, text_encoder, unet, **SMALL_AUX)
    with pytest.raises(
        NetworkWeightsError, match=r"'lora_te_\w+\.lora_down\.weight' of '.*lora\.safetensors' lies outside"
    ):
        network.load_weights(tmp_path / "lora.safetensors")
    with pytest.raises(NetworkWeightsError, match="lies outside this network's aux bases"):
        lilora.create_network_from_weights(1.0, tmp_path / "lora.safetensors", None, text_encoder, unet, **SMALL_AUX)


def test_a_joint_file_does_not_resume_a_two_factor_network(sd1, tmp_path):
    text_encoder, unet = fresh(sd1)
    joint = perturb(lilora.create_network(1.0, 4, 2, None, text_encoder, unet, init="joint"))
    joint.save_weights(tmp_path / "x.lilora.safetensors", None, {})
    with pytest.raises(NetworkWeightsError, match="trained with init=joint"):
        lilora.create_network(1.0, 4, 2, None, text_encoder, unet).load_weights(tmp_path / "x.lilora.safetensors")


# ---- inference and diffusers ----


def test_for_inference_a_lilora_file_is_a_lora(sd1, tmp_path):
    ours, merged = fresh(sd1), fresh(sd1)
    network = perturb(lilora.create_network(1.0, 4, 2, None, *ours, **SMALL_AUX))
    network.save_weights(tmp_path / "x.lilora.safetensors", None, {})
    network.apply_to(*ours)
    base, weights = lilora.create_network_from_weights(
        1.0, tmp_path / "x.lilora.safetensors", None, *merged, for_inference=True
    )
    assert base.module_name == "networks.lora"
    base.merge_to(*merged, weights, None, "cpu")  # --base_weights
    assert_outputs_close(outputs(*merged), outputs(*ours))


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_diffusers_loads_the_standard_file_as_our_network_computes_it(tiny_sd, tmp_path, name):
    pipeline = StableDiffusionPipeline.from_pretrained(getattr(tiny_sd, f"{name}_dir"), local_files_only=True)
    pipeline.unet.to(torch.float64)  # see TOLERANCES: the tiny UNet amplifies float32 rounding
    ours = copy.deepcopy(pipeline.text_encoder), copy.deepcopy(pipeline.unet)
    network = perturb(lilora.create_network(1.0, 4, 2, None, *ours, conv_dim="2", **SMALL_AUX)).to(torch.float64)
    network.save_weights(tmp_path / "x.safetensors", None, {})
    network.apply_to(*ours)

    pipeline.load_lora_weights(str(tmp_path), weight_name="x.safetensors")  # raises on keys it cannot map
    adapted = {
        part: sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in getattr(pipeline, part).modules())
        for part in ("text_encoder", "unet")
    }
    assert adapted == {"text_encoder": len(network.text_encoder_loras), "unet": len(network.unet_loras)}
    assert_outputs_close(outputs(pipeline.text_encoder, pipeline.unet), outputs(*ours))
