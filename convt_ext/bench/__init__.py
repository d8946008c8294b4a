"""Benchmark convt_ext against PyTorch's own kernels.

    python -m convt_ext.bench --quick         # a first look: a few small shapes, one round (under a minute)
    python -m convt_ext.bench                 # the full suite (CUDA when available)
    python -m convt_ext.bench --ops conv_transpose2d --shapes dcgan --dtype bfloat16
    python -m convt_ext.bench --dims 1,3      # only the 1-d (audio) and 3-d (video, volume) shapes
    python -m convt_ext.bench --model mobilenetv2 --quick   # a model, then its conv layers one by one
    python -m convt_ext.bench --model resnet18 --quick      # the same for ResNet-18

For every case (op x shape x direction) each implementation is first checked
against torch's default kernel (torch.testing.assert_close), then timed with
torch.utils.benchmark.Timer.blocked_autorange, ours and torch's interleaved
over R rounds. Each figure is the median over rounds; speedups are the median
of per-round ratios torch_time / our_time (> 1: convt_ext is faster). Every
rate is compared with a measured ceiling of the machine, and the run ends by
checking the project's performance goals (pass or miss).

One module per concern:
  suite.py    the layers timed (SUITE) and the cases a command line selects
  measure.py  the comparators (torch's kernels next to ours), the check, the timing
  machine.py  the machine and its ceilings (fp32 FMA peak from GEMMs, copy bandwidth)
  report.py   rates, the table, the summary, the performance goals, the JSON
  chart.py    the figures: one at a glance, and an appendix with every case
  model.py    --model dcgan, the model modes' interleaved timing loop, and the classifiers' harness
  mobilenetv2.py  --model mobilenetv2: inference and a training step, NCHW and channels_last
  resnet18.py     --model resnet18: the same for ResNet-18, each conv layer forward held to a goal
  layers.py   a model's conv layers one by one against torch's, as a table
  __main__.py the command line
See benchmarks/README.md.
"""
