"""Monkeypatch: step-0 BN re-estimation as FP running stats + (quantized estimate - FP estimate) on the same batches."""
import os, torch
from ultralytics_gabfusion import qat_setup as Q
from ultralytics_gabfusion.stability import recalibrate_bn, _batchnorms
from ultralytics_gabfusion.quant.qconv import quantizers_disabled

if os.environ.get("GAB_DELTA"):
    _base = {}

    @torch.no_grad()
    def delta_recalibrate(model, images):
        bns = _batchnorms(model)
        for m in bns:
            _base.setdefault(id(m), (m.running_mean.clone(), m.running_var.clone()))
        with quantizers_disabled(model):
            recalibrate_bn(model, images)
        fp = {id(m): (m.running_mean.clone(), m.running_var.clone()) for m in bns}
        n = recalibrate_bn(model, images)
        for m in bns:
            mu0, v0 = _base[id(m)]
            mf, vf = fp[id(m)]
            mq, vq = m.running_mean, m.running_var
            ok = (vf > m.eps) & (vq > m.eps)
            m.running_mean.copy_(torch.where(ok, mu0 + (mq - mf), mu0))
            m.running_var.copy_(torch.where(ok, v0 * vq / vf.clamp_min(m.eps), v0))
        return n

    Q.recalibrate_bn = delta_recalibrate
