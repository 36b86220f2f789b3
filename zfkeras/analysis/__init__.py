"""The experiments of Zeiler & Fergus (2013), one small module each.

Every module pairs library functions (arrays in, arrays out) with one
`Config` dataclass and one function that runs the whole experiment on a
trained run and writes the paper's figure (PNG) and the numbers behind it
(JSON / CSV); the tools in tools/ are thin flag front ends to these.

- `topk`: top-9 mining over a dataset split and its projections (Fig. 2).
- `evolution`: the strongest activation of chosen maps, projected, at each
  snapshot epoch (Fig. 4), and `EvolutionCallback` for TensorBoard.
- `occlusion`: occlusion sensitivity maps (Fig. 7).
- `invariance`: feature distances under translation, scale, rotation (Fig. 5).
- `architecture`: first-layer filters and layer-2 projections of two models,
  dead filters, frequency content (Fig. 6).
- `correspondence`: part occlusion consistency Delta_l (Table 1).
- `probes`: per-layer linear probes and transfer (Tables 4-7).

`plots_a` holds figure helpers of the first three. Nothing is imported here:
`import zfkeras.analysis.topk` and so on.
"""
