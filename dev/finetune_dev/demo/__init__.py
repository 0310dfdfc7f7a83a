"""`finetune-dev demo`: the whole flow on this machine, with no cluster and no GPU.

`cli` drives it; `nodeagent` is the kubelet stand-in that runs pods as local processes;
`pods` holds its pure rules (image mapping, volume support, path translation); `kubeapi`
is the demo's only Kubernetes API I/O; `tinymodel` makes the demo's base model.
"""
