"""pytorch-fid's FID Inception-v3 (`pt_inception-2015-12-05-6726825d.pth`: torchvision's `Inception3` names)
-> `metrics.inception.FIDInceptionV3`, whose attribute names are torchvision's, so the mapping is the leaf
names and layouts only:

    <block>/conv/kernel           <block>.conv.weight           (OIHW -> HWIO)
    <block>/bn/{scale,bias}       <block>.bn.{weight,bias}
    <block>/bn/{mean,var}         <block>.bn.running_{mean,var}
    fc/{kernel,bias}              fc.{weight,bias}              ([out, in] -> [in, out])

BatchNorm's `num_batches_tracked` counters are training state: ignored.
"""

from diffusion_jax.convert.mapping import Rule

RULES = [
    Rule(r"(.+)/conv/kernel", "{0}.conv.weight", "conv"),
    Rule(r"(.+)/bn/scale", "{0}.bn.weight"),
    Rule(r"(.+)/bn/bias", "{0}.bn.bias"),
    Rule(r"(.+)/bn/mean", "{0}.bn.running_mean"),
    Rule(r"(.+)/bn/var", "{0}.bn.running_var"),
    Rule(r"fc/kernel", "fc.weight", "linear"),
    Rule(r"fc/bias", "fc.bias"),
]
IGNORED = (r".*\.num_batches_tracked",)
