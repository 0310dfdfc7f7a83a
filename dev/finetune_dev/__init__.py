"""Developer tools for finetune-operator, never shipped in an image.

`devcluster` builds and runs a real local control plane (etcd, kube-apiserver,
controller-manager, scheduler, KWOK fake GPU nodes) from Go modules; `demo` runs the
whole flow on it with a kubelet stand-in; `tinymodel` makes the tiny Llama-architecture
model and tokenizer the demo and the tests train.
"""
