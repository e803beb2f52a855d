"""The embedded default dataset: procedural indoor rooms written in ScanNet's raw format.

``generate(out, scenes, seed)`` builds rooms (floor, walls, optional ceiling, wall-mounted
doors / windows / pictures / curtains, furniture made of boxes and vertical cylinders in varying
number, size and arrangement, against the walls or free-standing at any yaw; every instance
draws its material and colours from one pool shared by all classes, so colour does not name
the class), renders a camera trajectory per room by exact ray casting (numpy, vectorised; each
primitive only tests the rays inside its projected bounding rectangle), and writes, under
``out/``:

- ``scans/<scene>/<scene>.sens`` (version 4; JPEG colour at twice the depth resolution with
  its own intrinsics, zlib uint16 depth in mm, depth shift 1000, camera-to-world poses; frames
  ``i % 40 == 20`` have a -inf pose and odd scenes have one all-zero depth frame, as real
  ScanNet does, so the skip paths run),
- ``scans/<scene>/<scene>_vh_clean_2.ply`` and ``<scene>_vh_clean_2.labels.ply`` (binary PLY;
  vertex colours; ``label`` = NYU40 id), in the ``.sens`` pose frame (world z up),
- ``scans/<scene>/<scene>_2d-label-filt.zip``: ``label-filt/<frame>.png``, 16-bit ScanNet
  label ids at colour resolution; ``scannetv2-labels.combined.tsv`` maps them to NYU40,
- ``scannetv2_train.txt`` / ``scannetv2_val.txt``.

Lighting is Lambertian from a point light (view independent), so the mesh's vertex colours
and the images agree. A ``kind: synthetic`` dataset generates into ``<workdir>/raw/<name>``
once and is read by the unchanged ScanNet reader, so the demo runs the real ScanNet path.
"""

from lift3d.pipeline.synthetic.write import generate, write_ply

__all__ = ["generate", "write_ply"]
