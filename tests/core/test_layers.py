"""One table maps weight-file index <-> host attn2 key <-> transformer_index for SD1.5's 16 cross-attention layers."""
from ipadapter_core import BY_HOST_KEY, BY_LAYER_INDEX, BY_TRANSFORMER_INDEX, SD15_LAYERS


def test_sixteen_layers_with_odd_weight_indices():
    assert len(SD15_LAYERS) == 16
    assert sorted(l.layer_index for l in SD15_LAYERS) == list(range(1, 32, 2))
    assert [l.transformer_index for l in SD15_LAYERS] == list(range(16))


def test_input_blocks_map_to_indices_1_to_11():
    assert [(l.host_key, l.layer_index) for l in SD15_LAYERS[:6]] == [
        (("input", 1, 0), 1), (("input", 2, 0), 3), (("input", 4, 0), 5), (("input", 5, 0), 7),
        (("input", 7, 0), 9), (("input", 8, 0), 11)]


def test_middle_block_is_index_31_and_runs_seventh():
    middle = BY_HOST_KEY[("middle", 0, 0)]
    assert (middle.layer_index, middle.transformer_index, middle.channels) == (31, 6, 1280)


def test_output_blocks_3_to_11_map_to_13_to_29():
    assert [(BY_TRANSFORMER_INDEX[t].host_key[1], BY_TRANSFORMER_INDEX[t].layer_index) for t in range(7, 16)] == \
        [(3, 13), (4, 15), (5, 17), (6, 19), (7, 21), (8, 23), (9, 25), (10, 27), (11, 29)]


def test_channels_follow_the_unet_widths():
    assert [BY_LAYER_INDEX[i].channels for i in range(1, 32, 2)] == \
        [320, 320, 640, 640, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]
