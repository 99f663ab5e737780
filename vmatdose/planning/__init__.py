"""From a predicted dose to a deliverable plan: dose mimicking with a planning engine.

``python -m vmatdose.plan`` (:mod:`vmatdose.plan`) runs :func:`.run.run_planning`: for each
case file and its predicted dose it builds a 6 MV photon plan with the case's beam
arrangement, computes the dose influence matrix with pyRadPlan's pencil-beam engine,
optimises the bixel weights so that the plan's dose mimics the prediction (voxel-wise in
targets and organs at risk, the protocol's clinical constraints as penalties), enforces
the criteria in a second stage on the case grid (the *fluence plan*), sequences each
beam into step-and-shoot MLC segments (the *deliverable plan*, written as a DICOM RT
Plan) and writes the doses, the fluence maps and a four-way evaluation (reference plan,
prediction, fluence plan, deliverable plan).

pyRadPlan is an optional extra (``pip install -e ".[plan]"``): nothing here imports it at
module level, so the checks that need no engine run without it (:mod:`.engine`).

Modules, one concept each:

* :mod:`.settings`: the planning settings (dose grid, bixel width, sparsity cut-off,
  objective weights, memory limit) from the config;
* :mod:`.engine`: the optional pyRadPlan import and its install message;
* :mod:`.arrangement`: the case's beams (recorded, or the protocol's default);
* :mod:`.preflight`: every case checked (prediction, targets, protocol, memory estimate)
  before any optimisation starts;
* :mod:`.patient`: a case as pyRadPlan's CT and structure set;
* :mod:`.objectives`: mimicking objectives and constraint penalties;
* :mod:`.optimise`: steering file, dose influence matrix, the stages (mimicking, criteria,
  sequencing, segment weights, normalisation), doses, time and peak memory;
* :mod:`.dose_grid`: the engine's dose grid and its interpolation onto case voxels;
* :mod:`.refinement`: the criteria stage's objective (criteria terms, smoothness) and
  optimiser, over bixel or segment weights;
* :mod:`.sequencing`: one fluence map -> step-and-shoot segments within machine limits;
* :mod:`.mlc`: segments as leaf and jaw positions (mm);
* :mod:`.delivery`: every beam sequenced, the aperture matrix, MU per fraction;
* :mod:`.rtplan`: the deliverable plan as a DICOM RT Plan;
* :mod:`.memory`: peak resident memory of a block of work;
* :mod:`.fluence`: per-beam fluence maps (arrays and figure);
* :mod:`.comparison`: reference / prediction / deliverable side by side;
* :mod:`.run`: the per-case loop and its output files.
"""
