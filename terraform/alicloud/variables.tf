variable "region" {
  description = "Alibaba Cloud region to build the test cluster in."
  type        = string
  default     = "eu-central-1"
}

variable "zone_id" {
  description = "Zone of the vSwitch and the nodes, or null for the first zone that offers instance_type."
  type        = string
  default     = null
}

variable "cluster_name" {
  description = "Name of the test cluster; prefixes every resource and is the ali-vpc ClusterName."
  type        = string
  default     = "cloudroutes-test"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,30}$", var.cluster_name))
    error_message = "The cluster_name must be 1-31 characters of a-z, 0-9 and '-', starting with a letter."
  }
}

variable "node_count" {
  description = "Number of nodes. The first one also runs the cluster's single-member etcd."
  type        = number
  default     = 3

  validation {
    condition     = var.node_count >= 1 && var.node_count <= 40 && floor(var.node_count) == var.node_count
    error_message = "The node_count must be a whole number from 1 to 40 (each node's route entry counts against the route table's quota)."
  }
}

variable "instance_type" {
  description = "ECS instance type of the nodes."
  type        = string
  default     = "ecs.g6.large"
}

variable "image_name_regex" {
  description = "Name pattern of the public image of the nodes; the newest match is used (the user data needs Debian 12 or a derivative)."
  type        = string
  default     = "^debian_12_.*x64"
}

variable "key_name" {
  description = "Name of an existing ECS key pair for SSH, or null for none."
  type        = string
  default     = null
}

variable "ssh_cidr_blocks" {
  description = "IPv4 ranges allowed to reach the nodes on port 22 (empty: no SSH rule)."
  type        = list(string)
  default     = []
}

variable "internet_bandwidth" {
  description = "Public bandwidth of each node in Mbit/s; more than 0 gives the node a public IP, which it needs to install packages."
  type        = number
  default     = 10
}

variable "vpc_cidr" {
  description = "IPv4 range of the VPC."
  type        = string
  default     = "10.0.0.0/16"
}

variable "vswitch_cidr" {
  description = "IPv4 range of the nodes' vSwitch, inside vpc_cidr."
  type        = string
  default     = "10.0.1.0/24"
}

variable "first_node_host" {
  description = "Host number (in vswitch_cidr) of the first node's private IP; node i gets first_node_host + i. Alibaba reserves host 0 and the last three."
  type        = number
  default     = 10

  validation {
    condition     = var.first_node_host >= 1
    error_message = "The first_node_host must be 1 or more: Alibaba reserves the first address of a vSwitch."
  }
}

variable "pod_network" {
  description = "The Network of the cloudroutes config: the pod range the node subnets are leased from."
  type        = string
  default     = "10.244.0.0/16"
}

variable "mode" {
  description = "ali-vpc Mode: node (each node programs its own route) or cluster (one elected leader programs all)."
  type        = string
  default     = "node"

  validation {
    condition     = contains(["node", "cluster"], var.mode)
    error_message = "The mode must be node or cluster."
  }
}

variable "controller_role" {
  description = "Also create a RAM role with the cluster-mode controller policy."
  type        = bool
  default     = false
}

variable "cloudroutes_package" {
  description = "What each node installs with pip: a requirement such as cloudroutes[alicloud]==0.1.0, or a wheel URL with [alicloud]."
  type        = string
  default     = "cloudroutes[alicloud]"
}

variable "healthz_port" {
  description = "Port of the agents' /healthz, /readyz, /metrics and /status, reachable from inside the VPC."
  type        = number
  default     = 8471
}
