// Python bindings of the CPU kernels (fastbml._C). Tensors cross as raw buffer addresses:
// no libtorch linkage, so the module builds against any torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "axpby.h"
#include "combined_nll.h"
#include "lerp.h"
#include "prototype_cross_entropy.h"
#include "row_drop.h"
#include "scale_noise.h"
#include "split_gram.h"
#include "true_class_prob.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastbml CPU kernels (C++/OpenMP)";
  m.def("multi_tensor_scale_noise", &fastbml::multi_tensor_scale_noise,
        py::call_guard<py::gil_scoped_release>(), py::arg("ptrs"), py::arg("dtypes"),
        py::arg("numels"), py::arg("offsets"), py::arg("scale_index"), py::arg("scales_ptr"),
        py::arg("noise"), py::arg("seed"), py::arg("stream"), py::arg("eps"),
        py::arg("std_ptr"));
  m.def("multi_tensor_moments", &fastbml::multi_tensor_moments,
        py::call_guard<py::gil_scoped_release>(), py::arg("ptrs"), py::arg("dtypes"),
        py::arg("numels"), py::arg("out_ptr"));
  m.def("true_class_prob_sums", &fastbml::true_class_prob_sums,
        py::call_guard<py::gil_scoped_release>(), py::arg("logits_ptrs"), py::arg("dtype"),
        py::arg("batch"), py::arg("n_classes"), py::arg("labels_ptr"), py::arg("out_ptr"));
  m.def("combined_nll_sums", &fastbml::combined_nll_sums,
        py::call_guard<py::gil_scoped_release>(), py::arg("logits_ptr"), py::arg("dtype"),
        py::arg("n_sets"), py::arg("batch"), py::arg("n_classes"), py::arg("weights_ptr"),
        py::arg("n_groups"), py::arg("labels_ptr"), py::arg("max_nll"), py::arg("out_ptr"));
  m.def("row_drop_scale", &fastbml::row_drop_scale, py::call_guard<py::gil_scoped_release>(),
        py::arg("in_ptrs"), py::arg("out_ptrs"), py::arg("dtype"), py::arg("batch"),
        py::arg("dims"), py::arg("row_strides"), py::arg("q_ptr"), py::arg("threshold"),
        py::arg("seed"), py::arg("mask_seed"), py::arg("coin_stream"), py::arg("mask_stream"),
        py::arg("weights_ptr"), py::arg("executed_ptr"));
  m.def("multi_tensor_lerp", &fastbml::multi_tensor_lerp, py::call_guard<py::gil_scoped_release>(),
        py::arg("ptrs"), py::arg("target_ptrs"), py::arg("dtypes"), py::arg("numels"),
        py::arg("weight_index"), py::arg("weights_ptr"));
  m.def("prototype_cross_entropy_forward", &fastbml::prototype_cross_entropy_forward,
        py::call_guard<py::gil_scoped_release>(), py::arg("features_ptr"), py::arg("dtype"),
        py::arg("batch"), py::arg("dim"), py::arg("row_stride"), py::arg("prototypes_ptr"),
        py::arg("n_classes"), py::arg("mask_ptr"), py::arg("labels_ptr"), py::arg("loss_ptr"),
        py::arg("lse_ptr"));
  m.def("prototype_cross_entropy_backward", &fastbml::prototype_cross_entropy_backward,
        py::call_guard<py::gil_scoped_release>(), py::arg("grad_ptr"), py::arg("features_ptr"),
        py::arg("dtype"), py::arg("batch"), py::arg("dim"), py::arg("row_stride"),
        py::arg("prototypes_ptr"), py::arg("n_classes"), py::arg("mask_ptr"),
        py::arg("labels_ptr"), py::arg("lse_ptr"), py::arg("out_ptr"));
  m.def("multi_tensor_split_gram", &fastbml::multi_tensor_split_gram,
        py::call_guard<py::gil_scoped_release>(), py::arg("sum_ptrs"), py::arg("part_ptrs"),
        py::arg("dtypes"), py::arg("numels"), py::arg("out_ptr"));
  m.def("multi_tensor_axpby", &fastbml::multi_tensor_axpby,
        py::call_guard<py::gil_scoped_release>(), py::arg("x_ptrs"), py::arg("y_ptrs"),
        py::arg("dtypes"), py::arg("numels"), py::arg("coeffs_ptr"));
}
