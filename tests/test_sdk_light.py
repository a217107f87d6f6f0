import subprocess
import sys


def test_client_sdk_imports_without_the_serving_stack():
    code = ("import sys, kvmesh_client\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'vllm', 'transformers', 'kv_store', 'router', 'engine_host', 'cluster'})\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "[]"
