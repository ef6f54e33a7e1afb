"""A Kubernetes API emulator faithful to kube-apiserver where our operator can tell, built on kmock.

Public surface::

    from lora_operator.emulator import FaithfulEmulator, serve_emulator

    with serve_emulator(crds=[crd_dict]) as emu:
        emu.url                      # http://127.0.0.1:<port>
        emu.write_kubeconfig(path)   # for kubernetes.config.load_kube_config and Kopf (KUBECONFIG)
        emu.register_crd(other_crd)

What it does and does not emulate: docs/emulator.md.
"""

from lora_operator.emulator.errors import ApiError
from lora_operator.emulator.server import FaithfulEmulator
from lora_operator.emulator.threaded import RunningEmulator, kubeconfig_dict, serve_emulator

__all__ = ["ApiError", "FaithfulEmulator", "RunningEmulator", "kubeconfig_dict", "serve_emulator"]
