"""rayrlhf/training/weight_buckets.py: the bucket layout worked by hand, packing and unpacking exactly, tied
tensors sent once, and the broadcast group (gloo, three members in threads) delivering every bucket."""
import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rayrlhf.training.weight_buckets import (BroadcastGroup, bucket_size, distinct_tensors, pack_bucket, plan_buckets,
                                        unpack_bucket)
from rayrlhf.config import load_config
from rayrlhf.errors import ConfigError
from rayrlhf.training.distributed import free_port


def mixed_tensors():
    """16, 20, 8 and 100 bytes, in three dtypes."""
    torch.manual_seed(0)
    return {"a": torch.randn(4), "b": torch.randn(2, 5).to(torch.bfloat16), "c": torch.tensor([7]), "d": torch.randn(25)}


def test_bucket_layout_by_hand():
    plan = plan_buckets(mixed_tensors(), bucket_bytes=64)
    # a at 0 (16 bytes); b at 16 (20 bytes, next start rounded up to 48); c at 48 (8 bytes, ends at 56 <= 64);
    # d (100 bytes) does not fit after c, and alone exceeds 64 bytes: a bucket of its own.
    assert [[(slot.name, slot.offset, slot.nbytes) for slot in bucket] for bucket in plan] == [
        [("a", 0, 16), ("b", 16, 20), ("c", 48, 8)], [("d", 0, 100)]]
    assert [bucket_size(bucket) for bucket in plan] == [56, 100]


def test_pack_then_unpack_gives_the_same_tensors():
    tensors = mixed_tensors()
    for bucket_bytes in (1, 64, 10**6):
        received = {}
        for bucket in plan_buckets(tensors, bucket_bytes):
            received.update(unpack_bucket(pack_bucket(tensors, bucket).clone(), bucket))
        assert received.keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor)


def test_tied_tensors_are_sent_once():
    config = LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         tie_word_embeddings=True)
    state = LlamaForCausalLM(config).state_dict()
    distinct = distinct_tensors(state)
    assert "model.embed_tokens.weight" in distinct and "lm_head.weight" not in distinct
    assert set(state) - set(distinct) == {"lm_head.weight"}


def broadcast_in_threads(device: str, members: int):
    """Member 0 sends mixed_tensors() in 64-byte buckets to members 1.. (threads; on CUDA member i on GPU i);
    returns what each receiver got."""
    tensors, port = mixed_tensors(), free_port()
    if device == "cuda":
        tensors = {name: tensor.to("cuda:0") for name, tensor in tensors.items()}
    plan = plan_buckets(tensors, bucket_bytes=64)
    received, errors = {}, []

    def member(index):
        try:
            if device == "cuda":
                torch.cuda.set_device(index)  # per thread: NCCL needs each member on its own GPU
            group = BroadcastGroup("127.0.0.1", port, index, members, device)
            if index == 0:
                group.send(tensors, plan)
            else:
                received[index] = group.receive(plan)
        except Exception as error:  # surfaced below, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=member, args=(index,)) for index in range(members)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return tensors, received


def test_a_gloo_broadcast_group_delivers_every_bucket_to_every_member():
    tensors, received = broadcast_in_threads("cpu", members=3)
    assert sorted(received) == [1, 2]
    for weights in received.values():
        for name, tensor in tensors.items():
            assert torch.equal(weights[name], tensor)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per member")
def test_an_nccl_broadcast_group_delivers_every_bucket_to_every_gpu():
    members = min(torch.cuda.device_count(), 4)
    tensors, received = broadcast_in_threads("cuda", members)
    assert sorted(received) == list(range(1, members))
    for index, weights in received.items():
        for name, tensor in tensors.items():
            assert weights[name].device == torch.device("cuda", index)
            assert torch.equal(weights[name].cpu(), tensor.cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_nccl_group_of_one_packs_and_broadcasts_on_the_gpu():
    """What one GPU can check of the NCCL path: the group forms and a packed GPU bucket survives the broadcast."""
    tensors = {name: tensor.cuda() for name, tensor in mixed_tensors().items()}
    plan = plan_buckets(tensors, bucket_bytes=64)
    group = BroadcastGroup("127.0.0.1", free_port(), 0, 1, "cuda")
    for bucket in plan:
        for name, tensor in unpack_bucket(group.broadcast(pack_bucket(tensors, bucket)), bucket).items():
            assert tensor.is_cuda and torch.equal(tensor, tensors[name])


def test_broadcast_on_shared_gpus_is_refused():
    with pytest.raises(ConfigError, match="NCCL refuses two members on one GPU"):
        load_config("conf/tiny.yaml", ["resources.device=cuda", "resources.gpus_per_actor=0.5", "rollout.weight_sync=broadcast"])
