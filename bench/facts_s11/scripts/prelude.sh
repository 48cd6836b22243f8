# sourced on the device from the repo root: unpack the snapshot into /tmp/w with runs/, cd there
export PYTHONUNBUFFERED=1
REPO=$PWD
rm -rf /tmp/w; mkdir -p /tmp/w && tar xzf .dev/head.tgz -C /tmp/w || exit 1
[ -d runs ] && cp -r runs /tmp/w/
cp .dev/head.rev /tmp/w/ 2>/dev/null; [ -d /tmp/w/superlinear_lab/models ] || cp -r superlinear_lab/models /tmp/w/superlinear_lab/models
mkdir -p /tmp/site && ln -sfn /tmp/w/kernels /tmp/site/superlinear_kernels
cd /tmp/w; export PYTHONPATH=/tmp/w:/tmp/site
echo "snapshot $(cat head.rev) | $(python3 -c 'import torch,triton;print("torch",torch.__version__,"triton",triton.__version__,torch.cuda.get_device_name())')"
