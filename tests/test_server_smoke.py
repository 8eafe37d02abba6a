"""The server starts on the demo model, answers, and exits 0 on SIGTERM."""
import numpy as np

from remotelens.v1 import remotelens_pb2 as pb
from remotelens.v1 import tensor_pb2


def test_model_info_and_run(demo_server):
    stub = demo_server.stub()
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.model_name == "remotelens-demo"
    # hook_embed, ln_final.* and unembed.*, then 26 per block (5 of them opt-in: attn_in, q/k/v_input, mlp_in)
    assert len(info.hooks) == 5 + 26 * info.n_layers
    tokens = np.array([[1, 2, 3]], dtype=np.int64)
    request = pb.RunRequest(tokens=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=[1, 3],
                                                     data=tokens.tobytes()))
    items = list(stub.Run(request))
    assert items[0].tensor.name == "logits"
    assert list(items[0].tensor.shape) == [1, 3, info.d_vocab]
    assert items[-1].HasField("summary")
