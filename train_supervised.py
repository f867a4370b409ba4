"""Supervised baseline: the labeled cases only, nothing semi-supervised.

The lower bound every semi-supervised method in this repository is compared with (and, with
`--labeled_num all`, the fully supervised upper bound). Same network, data, augmentation,
optimizer and schedule as the method scripts; each batch holds --labeled_bs labeled samples.

Loss: 0.5 x (cross-entropy + soft Dice), the supervised loss of SSL4MIS, UA-MT and their successors
(`common.supervised_loss`). Optimizer: SGD, momentum 0.9, weight decay 1e-4, learning rate
--base_lr with the --lr_schedule (poly by default, as SSL4MIS), set after each step as SSL4MIS does
(step k runs at the schedule's value for k - 1). Network, init and augmentation: the data set's
field defaults (SSL4MIS U-Net and RandomGenerator for ACDC, UA-MT's V-Net and crop for LA).

This file is the template of the method scripts: a method script is this file plus its own
losses and modules above `main()` and its forward passes inside the loop.

    python train_supervised.py --dataset Phantom2D --labeled_num 2
    python test_2d.py --ckpt model/Phantom2D_run_2_labeled/supervised/last.pth
"""
import argparse

import torch

import common


def main(argv=None):
    parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    args = common.parse_args(parser, argv, defaults={"*": {"dataset": "ACDC"}})
    common.seed_everything(args.seed, args.deterministic)
    info = common.get_dataset(args.dataset, args.root_path)
    root = common.resolve_root(info, args.root_path)

    loader, n_labeled, _ = common.train_loader(args, info, root, labeled_only=True)
    net = common.default_network(info).to(args.device)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.base_lr, momentum=0.9, weight_decay=1e-4)
    scaler = common.grad_scaler(args)
    run = common.Run(args, "supervised", models={"net": net}, optimizers={"optimizer": optimizer, "scaler": scaler})
    run.log(f"{n_labeled} labeled training samples, batches of {args.labeled_bs}")

    # ---- standard loop ----
    net.train()
    with run:
        for iteration, batch in run.batches(loader):
            common.set_lr(optimizer, common.lr_at(args.lr_schedule, args.base_lr, iteration, args.max_iterations))
            image, label = batch["image"].to(args.device), batch["label"].to(args.device)
            with common.autocast(args):
                logits = net(image)
            loss = common.supervised_loss(logits.float(), label)
            run.viz(iteration, image[0], {"label": label[0], "prediction": logits[0]})  # a labeled sample

            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            run.step(iteration, {"loss": loss})
        run.finish()


if __name__ == "__main__":
    common.cli(main)
