// A user's program: one training step through the Accelerator and a safetensors round trip.
// Built by tests/consumer/run.sh against an installed accelerate-cpp and as a subproject.
#include <accelerate/accelerate.h>
#include <accelerate/safetensors.h>
#include <torch/torch.h>

#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>

int main(int argc, char** argv) {
  const std::filesystem::path dir = argc > 1 ? argv[1] : ".";

  accelerate::Accelerator accelerator;
  torch::nn::Linear model(3, 1);
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.1));
  auto [net, opt] = accelerator.prepare(model, sgd);
  auto x = torch::ones({4, 3});
  auto loss = net->forward(x).pow(2).mean();
  accelerator.backward(loss);
  opt.step();
  opt.zero_grad();

  const auto path = (dir / "consumer.safetensors").string();
  accelerate::safetensors::save_file(net->named_parameters(), path, {{"format", "pt"}});
  auto file = accelerate::safetensors::load_file(path);
  if (!file.get("weight").equal(net->weight.detach()) || file.metadata.at("format") != "pt") {
    std::cerr << "consumer: the safetensors round trip changed the weights\n";
    return EXIT_FAILURE;
  }
  std::cout << "consumer ok: " << accelerator.num_processes() << " process(es), "
            << file.names().size() << " tensors saved and loaded\n";
  return EXIT_SUCCESS;
}
